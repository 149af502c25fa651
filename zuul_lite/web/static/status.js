// Live status: fetch /api/status every few seconds and redraw the queues.
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

function renderBuild(build, now) {
  const row = el("tr");
  row.appendChild(el("td", build.job));
  row.appendChild(el("td", build.state, build.state));
  row.appendChild(el("td", build.result || "", build.result || ""));
  row.appendChild(el("td", duration(elapsed(build, now)), "num"));
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

function renderItem(item, now, shared) {
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
  for (const name of ["Job", "State", "Result", "Elapsed", "Logs"]) head.appendChild(el("th", name));
  table.appendChild(head);
  const builds = Object.values(bs.builds || {}).sort((a, b) => (a.index || 0) - (b.index || 0));
  for (const build of builds) table.appendChild(renderBuild(build, now));
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

function render(status) {
  root.replaceChildren();
  if (!status.pipelines.length) root.appendChild(el("p", "No pipelines have run yet.", "muted"));
  for (const pipeline of status.pipelines) {
    const section = el("section", null, "pipeline");
    section.appendChild(el("h2", `${pipeline.name} (${pipeline.items.length})`));
    if (!pipeline.items.length) section.appendChild(el("p", "Queue is empty.", "muted"));
    for (const queue of pipeline.queues || []) {
      if (!queue.dynamic) section.appendChild(el("h3", `queue ${queue.name}`));
      for (const item of queue.items) {
        section.appendChild(renderItem(item, status.now, !queue.dynamic));
      }
    }
    root.appendChild(section);
  }
}

async function refresh() {
  const updated = document.getElementById("updated");
  try {
    const response = await fetch("/api/status", {cache: "no-store"});
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    render(await response.json());
    updated.textContent = `Updated ${new Date().toLocaleTimeString()}`;
  } catch (err) {
    updated.textContent = `Could not load /api/status (${err.message}); retrying.`;
  }
  setTimeout(refresh, REFRESH_MS);
}

setupOperator();
refresh();
