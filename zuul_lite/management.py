"""Operator requests: enqueue, dequeue, promote (checked, then posted for the
scheduler, which carries them out on its own thread) and autohold requests
(stored for the launchers).

The CLI and the web's authenticated API both go through `request`, so a bad
request is refused with the same sentence wherever it comes from, and the
queue is unchanged.
"""

from __future__ import annotations

from zuul_lite import autohold
from zuul_lite import config as zconfig
from zuul_lite.connections.local import LocalConnection
from zuul_lite.exceptions import ZuulLiteError
from zuul_lite.layout import load_layout
from zuul_lite.model import ManagementEvent
from zuul_lite.state import ZuulState

KINDS = ("enqueue", "dequeue", "promote")


def local_connection(cfg: zconfig.ZuulConfig, state: ZuulState) -> LocalConnection:
    for name, c in cfg.connections.items():
        if c["driver"] == "local":
            return LocalConnection(name, c, state, cfg.state_dir)
    raise ZuulLiteError(f"{cfg.path} defines no local connection.")


def _queued(state: ZuulState, pipeline: str, change: int) -> list[dict]:
    for p in state.read_status()["pipelines"]:
        if p["name"] == pipeline:
            return [i for i in p["items"] if i["change"]["number"] == change]
    return []


def request(
    cfg: zconfig.ZuulConfig,
    state: ZuulState,
    kind: str,
    pipeline: str,
    change: int,
    patchset: int | None = None,
) -> str:
    """Post the request if it can be carried out; the sentence that says so.
    Raises ZuulLiteError with one sentence otherwise."""
    if kind not in KINDS:
        raise ZuulLiteError(f"There is no operator action {kind} ({', '.join(KINDS)}).")
    layout = load_layout(cfg.layout_path, cfg.jobs_dir, set(cfg.connections))
    if pipeline not in layout.pipelines:
        known = ", ".join(layout.pipelines)
        raise ZuulLiteError(f"There is no pipeline {pipeline} (pipelines: {known}).")
    queued = _queued(state, pipeline, change)
    if kind == "enqueue":
        found = local_connection(cfg, state).get_change(change, patchset)
        if found.status != "NEW":
            raise ZuulLiteError(f"Change {change} is {found.status.lower()}.")
        if any(i["change"]["patchset"] == found.patchset for i in queued):
            raise ZuulLiteError(f"Change {found.label} is already in {pipeline}.")
    elif not queued:
        raise ZuulLiteError(f"Change {change} is not in {pipeline}.")
    elif kind == "promote" and layout.pipelines[pipeline].manager != "dependent":
        raise ZuulLiteError(f"Pipeline {pipeline} has no shared queue to promote in.")
    state.put_management_event(
        ManagementEvent(type=kind, pipeline=pipeline, change=change, patchset=patchset).to_dict()
    )
    return f"Change {change}: {kind} in {pipeline} requested."


def add_autohold(
    cfg: zconfig.ZuulConfig,
    state: ZuulState,
    project: str,
    job: str,
    reason: str,
    count: int = 1,
    change: int | None = None,
) -> str:
    """Ask that the next `count` failing builds of `job` keep their node."""
    layout = load_layout(cfg.layout_path, cfg.jobs_dir, set(cfg.connections))
    if project not in layout.projects:
        known = ", ".join(sorted(layout.projects)) or "none"
        raise ZuulLiteError(f"There is no project {project} in the layout (projects: {known}).")
    if job not in layout.jobs or layout.jobs[job].noop:
        raise ZuulLiteError(f"There is no job {job} with a node in the layout.")
    if not 1 <= count <= 100:
        raise ZuulLiteError(f"An autohold count must be between 1 and 100, not {count}.")
    if not reason.strip():
        raise ZuulLiteError("An autohold needs a reason (who wants the node, and why).")
    request = autohold.add(
        state,
        autohold.AutoholdRequest(
            project=project, job=job, reason=reason.strip(), count=count, change=change
        ),
    )
    return f"Autohold {request.id} added: the next {count} failing {job} build(s) keep their node."


def delete_autohold(state: ZuulState, request_id: str) -> str:
    if not autohold.delete(state, request_id):
        raise ZuulLiteError(f"There is no autohold request {request_id}.")
    return f"Autohold {request_id} deleted (nodes it held stay until nodepool deletes them)."
