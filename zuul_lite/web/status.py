"""Read what the web shows from ZooKeeper: pipeline queues and local inbox changes.

The scheduler and the local inbox own these znodes (doc/architecture.md); the
web only reads them through the `nodepool_lite.zk` facade, so it can run in
its own process and keeps working across scheduler restarts.
"""

from __future__ import annotations

import time
from typing import Any

from nodepool_lite.zk import ZooKeeper

PIPELINES = "/zuul/pipelines"
LOCAL_CHANGES = "/zuul/local/changes"


def _read_all(zk: ZooKeeper, parent: str) -> list[dict[str, Any]]:
    """Every child's JSON (none if `parent` does not exist yet).

    A child removed between the listing and the read (an item just reported)
    is skipped rather than failing the whole page.
    """
    values = (zk.get_or_none(f"{parent}/{name}") for name in zk.get_children(parent))
    return [value for value in values if value is not None]


def read_status(zk: ZooKeeper) -> dict[str, Any]:
    """Pipelines by name, each with its queue items oldest first, as stored.

    `now` is the server's clock, so a browser with a skewed clock still shows
    the right elapsed time for running builds.
    """
    pipelines = []
    for name in zk.get_children(PIPELINES):
        items = _read_all(zk, f"{PIPELINES}/{name}/items")
        items.sort(key=lambda item: item.get("enqueue_time") or 0)
        pipelines.append({"name": name, "items": items})
    return {"now": time.time(), "pipelines": pipelines}


def read_change(zk: ZooKeeper, number: int) -> dict[str, Any] | None:
    """One local inbox change with its patchsets, votes and comments."""
    return zk.get_or_none(f"{LOCAL_CHANGES}/{number}")


def _summary(change: dict[str, Any]) -> dict[str, Any]:
    """A list row: the change and the latest vote of each pipeline on its newest patchset."""
    patchsets = change.get("patchsets") or []
    latest = max((ps["number"] for ps in patchsets), default=None)
    votes = {
        vote["pipeline"]: vote["value"]
        for vote in change.get("votes") or []
        if vote.get("patchset") == latest
    }
    keys = ("number", "project", "branch", "subject", "owner", "status")
    return {**{key: change.get(key) for key in keys}, "patchset": latest, "votes": votes}


def read_changes(zk: ZooKeeper) -> list[dict[str, Any]]:
    """Summaries of all local inbox changes, newest first."""
    changes = [_summary(change) for change in _read_all(zk, LOCAL_CHANGES)]
    changes.sort(key=lambda change: change.get("number") or 0, reverse=True)
    return changes
