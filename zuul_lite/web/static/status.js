// Live status: follow /api/status/stream (polling /api/status if it fails) and redraw the queues.
// Everything from the API goes in through textContent: subjects and job names
// come from patch authors and must never be parsed as HTML.
"use strict";

const REFRESH_MS = 5000;
const root = document.getElementById("pipelines");
const localChanges = root.dataset.localChanges === "true";

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

// A running build against the median of its job's recent successful builds.
function progress(build, now, estimate) {
  const cell = el("td");
  if (build.state !== "queued" || !build.running || !estimate) return cell;
  const bar = el("progress");
  bar.max = estimate;
  bar.dataset.start = build.start_time;  // moves on between changes (tick())
  advance(bar, (elapsed(build, now) || 0));
  cell.appendChild(bar);
  return cell;
}

function advance(bar, took) {
  bar.value = Math.min(took, bar.max);
  bar.title = took < bar.max ? `about ${duration(bar.max - took)} left` : "longer than usual";
}

function renderBuild(build, now, estimates) {
  const row = el("tr");
  row.appendChild(el("td", build.job));
  const state = buildState(build);
  row.appendChild(el("td", state, state === "running" ? "running" : "muted"));
  row.appendChild(el("td", build.result || "", build.result || ""));
  row.appendChild(el("td", build.node_type || "", "muted"));
  const cell = el("td", duration(elapsed(build, now)), "num");
  if (build.start_time && !build.end_time && build.elapsed == null) {
    cell.dataset.start = build.start_time;  // ticks on between changes (tick())
  }
  row.appendChild(cell);
  row.appendChild(progress(build, now, (estimates || {})[build.job]));
  const logs = el("td");
  if (build.log_url) logs.appendChild(link(build.log_url, "logs"));
  // Submitted and not finished: its launcher streams the output while it runs.
  else if (build.state === "queued" && build.uuid) {
    logs.appendChild(link(`/console/${build.uuid}`, "console"));
  }
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

const PASSING = new Set([null, undefined, "SUCCESS", "SKIPPED"]);

function failing(item) {
  if (item.error || item.buildset.merge_error) return true;
  return Object.values(item.buildset.builds || {}).some(
    (b) => b.early_failure || !PASSING.has(b.result));
}

function labelOf(item) {
  const change = item.change;
  return change.number === 0 ? change.branch : `${change.number},${change.patchset}`;
}

function renderItem(item, now, shared, estimates) {
  const change = item.change;
  const bs = item.buildset;
  const box = el("div", null, "item");
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
  if (operatorToken() && !isRef) box.appendChild(operatorButtons(item, change, shared));
  return box;
}

// Operator actions: only with the admin token (kept for this tab only); the
// server checks it and answers each request with one sentence.
const TOKEN_KEY = "zuul-lite-admin-token";

function operatorToken() {
  return sessionStorage.getItem(TOKEN_KEY);
}

function operatorButtons(item, change, shared) {
  const actions = el("div", null, "actions");
  for (const action of shared ? ["promote", "dequeue"] : ["dequeue"]) {
    const button = el("button", action);
    button.onclick = () => operate(item.pipeline, action, change.number);
    actions.appendChild(button);
  }
  return actions;
}

async function operate(pipeline, action, change) {
  const said = document.getElementById("operator-said");
  try {
    const response = await fetch(`/api/pipeline/${encodeURIComponent(pipeline)}/${action}`, {
      method: "POST",
      headers: {"Content-Type": "application/json", Authorization: `Bearer ${operatorToken()}`},
      body: JSON.stringify({change}),
    });
    const body = await response.json();
    said.textContent = typeof body.detail === "string" ? body.detail : `HTTP ${response.status}`;
  } catch (err) {
    said.textContent = `The request failed (${err.message}).`;
  }
}

function setupOperator() {
  const form = document.getElementById("operator-form");
  const input = document.getElementById("operator-token");
  form.onsubmit = (event) => {
    event.preventDefault();
    if (input.value) sessionStorage.setItem(TOKEN_KEY, input.value);
    else sessionStorage.removeItem(TOKEN_KEY);
    input.value = "";
    document.getElementById("operator-said").textContent = operatorToken()
      ? "Operator actions shown; the server checks the token on each."
      : "Operator actions hidden.";
  };
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

function render(status) {
  renderTimeToVote(status);
  root.replaceChildren();
  if (!status.pipelines.length) root.appendChild(el("p", "No pipelines have run yet.", "muted"));
  for (const pipeline of status.pipelines) {
    const section = el("section", null, "pipeline");
    section.appendChild(el("h2", `${pipeline.name} (${pipeline.items.length})`));
    if (!pipeline.items.length) section.appendChild(el("p", "Queue is empty.", "muted"));
    for (const queue of pipeline.queues || []) {
      if (!queue.dynamic) section.appendChild(el("h3", `queue ${queue.name}`));
      let previous = null;
      for (const item of queue.items) {
        const box = renderItem(item, status.now, !queue.dynamic, status.estimates);
        if (failing(item)) box.classList.add("failing");
        // Zuul's picture of a reset: an item not tested on top of the one
        // before it in the queue was re-based past that (failing) item.
        if (!queue.dynamic && previous && item.item_ahead !== previous.uuid) {
          box.classList.add("rebased");
          box.insertBefore(el("div", `re-based: not tested with ${labelOf(previous)}`, "meta"),
            box.children[1]);
        }
        section.appendChild(box);
        previous = item;
      }
    }
    root.appendChild(section);
  }
}

// Live: /api/status/stream sends the status at each change of a pipeline;
// between changes, elapsed times tick on from the server's clock. Should the
// stream fail (an old proxy), the page polls /api/status instead.
let last = null;

function show(status) {
  last = {status, received: Date.now() / 1000};
  redraw();
  document.getElementById("updated").textContent =
    `Live · last change ${new Date().toLocaleTimeString()}`;
}

function serverNow() {
  return last.status.now + (Date.now() / 1000 - last.received);
}

function redraw() {
  if (last) render({...last.status, now: serverNow()});
}

// Only the running builds' elapsed cells change between two statuses: the
// rest of the page stays as it is (a link under the pointer is not replaced).
function tick() {
  if (!last) return;
  const now = serverNow();
  for (const cell of root.querySelectorAll("td[data-start]")) {
    cell.textContent = duration(now - Number(cell.dataset.start));
  }
  for (const bar of root.querySelectorAll("progress[data-start]")) {
    advance(bar, now - Number(bar.dataset.start));
  }
}

async function poll() {
  const updated = document.getElementById("updated");
  try {
    const response = await fetch("/api/status", {cache: "no-store"});
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    show(await response.json());
    updated.textContent = `Updated ${new Date().toLocaleTimeString()} (polling)`;
  } catch (err) {
    updated.textContent = `Could not load /api/status (${err.message}); retrying.`;
  }
  setTimeout(poll, REFRESH_MS);
}

function follow() {
  if (!window.EventSource) return poll();
  const source = new EventSource("/api/status/stream");
  let opened = false;
  source.onopen = () => { opened = true; };
  source.onmessage = (event) => show(JSON.parse(event.data));
  source.onerror = () => {
    if (!opened) { source.close(); poll(); }  // never connected: poll instead
    // else EventSource reconnects by itself (the web restarted, a proxy timeout)
  };
}

setupOperator();
setInterval(tick, 1000);
follow();
