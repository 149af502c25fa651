// Live status: /api/status/stream sends the status as server-sent events
// each time it changes; between events a one-second tick moves the elapsed
// times and progress bars on (from the server's clock, so a skewed browser
// clock does not matter). Everything from the API goes in through
// textContent: subjects and job names come from patch authors and must
// never be parsed as HTML.
"use strict";

const TICK_MS = 1000;
const root = document.getElementById("pipelines");
const localChanges = root.dataset.localChanges === "true";
let last = null; // the newest status
let skew = 0; // server clock minus browser clock, seconds

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = text;
  if (className) node.className = className;
  return node;
}

function link(href, text) {
  const a = el("a", text);
  a.href = href;
  return a;
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "";
  const s = Math.max(0, Math.round(seconds));
  const m = Math.floor(s / 60);
  return m ? `${m}m ${String(s % 60).padStart(2, "0")}s` : `${s}s`;
}

function elapsed(build, now) {
  if (build.elapsed !== null && build.elapsed !== undefined) return build.elapsed;
  if (!build.start_time) return null;
  return (build.end_time || now) - build.start_time;
}

// Submitted to Gearman but not taken by a launcher yet: waiting, not running.
function buildState(build) {
  if (build.state === "queued") return build.running ? "running" : "waiting in gearman";
  return build.state;
}

function progress(build, now, estimate) {
  const cell = el("td");
  if (build.state !== "queued" || !build.running || !estimate) return cell;
  const bar = el("progress");
  bar.max = estimate;
  bar.value = Math.min(elapsed(build, now) || 0, estimate);
  const left = estimate - (elapsed(build, now) || 0);
  bar.title = left > 0 ? `about ${duration(left)} left` : "longer than usual";
  cell.appendChild(bar);
  return cell;
}

function renderBuild(build, now, estimates) {
  const row = el("tr");
  row.appendChild(el("td", build.job));
  const state = buildState(build);
  row.appendChild(el("td", state, state === "running" ? "running" : "muted"));
  row.appendChild(el("td", build.result || "", build.result || ""));
  row.appendChild(el("td", build.node_type || "", "muted"));
  row.appendChild(el("td", duration(elapsed(build, now)), "num"));
  row.appendChild(progress(build, now, (estimates || {})[build.job]));
  const logs = el("td");
  if (build.log_url) logs.appendChild(link(build.log_url, "logs"));
  row.appendChild(logs);
  return row;
}

function itemState(item) {
  const bs = item.buildset;
  if (item.error) return "error";
  if (bs.merge_state === "pending") return item.active ? "merging" : "waiting (outside the window)";
  if (bs.merge_state === "conflict") return "merge conflict";
  return "running";
}

function failing(item) {
  return Object.values(item.buildset.builds || {}).some(
    (b) => b.early_failure || (b.result && b.result !== "SUCCESS"),
  );
}

// `previous` is the item just ahead in the queue's list: an item tested on
// top of another one (a failing item ahead was left out) is drawn indented
// under the one it is now tested on, as Zuul draws a re-based gate queue.
function renderItem(item, now, estimates, previous, labels) {
  const change = item.change;
  const bs = item.buildset;
  const box = el("div", null, failing(item) ? "item failing" : "item");
  if (previous && item.item_ahead !== previous.uuid) {
    box.classList.add("rebased");
    const onto = item.item_ahead ? labels[item.item_ahead] : "the branch head";
    box.appendChild(el("div", `re-based onto ${onto}: the item ahead is failing`, "meta"));
  }
  const title = el("div");
  // Change 0 is a branch head (post): branch@commit, no change page to link to.
  const isRef = change.number === 0;
  const label = isRef
    ? `${change.branch}@${(change.newrev || "").slice(0, 12)}`
    : `${change.number},${change.patchset}`;
  title.appendChild(
    localChanges && !isRef ? link(`/change/${change.number}`, label) : el("b", label),
  );
  title.appendChild(document.createTextNode(` ${isRef ? change.ref || "" : change.subject || ""}`));
  box.appendChild(title);
  const ahead = (bs.changes || []).filter((c) => c !== label);
  const meta = [
    `${change.project} ${change.branch}`,
    change.owner, // none for a branch head
    itemState(item),
    `queued ${duration(now - item.enqueue_time)} ago`,
    ahead.length ? `tested on top of ${ahead.join(", ")}` : "",
  ].filter(Boolean).join(" · ");
  box.appendChild(el("div", meta, "meta"));
  if (bs.merge_error) box.appendChild(el("pre", bs.merge_error));
  if (item.error) box.appendChild(el("pre", item.error));
  const table = el("table");
  const head = el("tr");
  for (const name of ["Job", "State", "Result", "Node", "Elapsed", "Progress", "Logs"]) {
    head.appendChild(el("th", name));
  }
  table.appendChild(head);
  const builds = Object.values(bs.builds || {}).sort((a, b) => (a.index || 0) - (b.index || 0));
  for (const build of builds) table.appendChild(renderBuild(build, now, estimates));
  box.appendChild(table);
  return box;
}

function itemLabel(item) {
  const c = item.change;
  return c.number === 0 ? `${c.branch}@${(c.newrev || "").slice(0, 12)}` : `${c.number},${c.patchset}`;
}

function renderTimeToVote(status) {
  const box = document.getElementById("time-to-vote");
  const ttv = status.time_to_vote;
  if (!box || !ttv) return;
  box.textContent = ttv.count
    ? `Time to vote over the last day: p50 ${duration(ttv.p50)}, p95 ${duration(ttv.p95)} ` +
      `(${ttv.count} reports)`
    : "No reports in the last day.";
}

function render(status, now) {
  renderTimeToVote(status);
  root.replaceChildren();
  if (!status.pipelines.length) root.appendChild(el("p", "No pipelines have run yet.", "muted"));
  for (const pipeline of status.pipelines) {
    const section = el("section", null, "pipeline");
    section.appendChild(el("h2", `${pipeline.name} (${pipeline.items.length})`));
    if (!pipeline.items.length) section.appendChild(el("p", "Queue is empty.", "muted"));
    for (const queue of pipeline.queues || []) {
      if (!queue.dynamic) section.appendChild(el("h3", `queue ${queue.name}`));
      const labels = Object.fromEntries(queue.items.map((i) => [i.uuid, itemLabel(i)]));
      let previous = null;
      for (const item of queue.items) {
        section.appendChild(renderItem(item, now, status.estimates, previous, labels));
        previous = item;
      }
    }
    root.appendChild(section);
  }
}

function tick() {
  if (last) render(last, Date.now() / 1000 + skew);
}

function connect() {
  const updated = document.getElementById("updated");
  const source = new EventSource("/api/status/stream");
  source.onmessage = (message) => {
    const status = JSON.parse(message.data);
    if (status.error) {
      updated.textContent = `The server cannot read the status: ${status.error}`;
      return;
    }
    skew = status.now - Date.now() / 1000;
    last = status;
    tick();
    updated.textContent = `Live; last change ${new Date().toLocaleTimeString()}`;
  };
  // EventSource reconnects by itself after the `retry` the server set.
  source.onerror = () => {
    updated.textContent = "Connection to the server lost; reconnecting.";
  };
}

connect();
setInterval(tick, TICK_MS);
