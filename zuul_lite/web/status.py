"""Read what the web shows from ZooKeeper: pipeline queues and local inbox changes.

The scheduler and the local inbox own these znodes (doc/architecture.md); the
web only reads them through the `nodepool_lite.zk` facade, so it can run in
its own process and keeps working across scheduler restarts.
"""

from __future__ import annotations

import time
from typing import Any

from nodepool_lite.zk import ZooKeeper
from zuul_lite.state import ZuulState


def read_status(zk: ZooKeeper) -> dict[str, Any]:
    """The scheduler's view of its queues, plus `now` from the server's clock.

    `now` lets a browser with a skewed clock still show the right elapsed time
    for running builds. The state module owns the znode layout.
    """
    return {**ZuulState(zk).read_status(), "now": time.time()}


def read_change(zk: ZooKeeper, number: int) -> dict[str, Any] | None:
    """One local inbox change with its patchsets, votes and comments."""
    return zk.get_or_none(ZuulState(zk).local_path("changes", number))


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
    state = ZuulState(zk)
    names = zk.get_children(state.local_path("changes"))
    found = (zk.get_or_none(state.local_path("changes", name)) for name in names)
    # A change deleted between the listing and the read is simply skipped.
    changes = [_summary(change) for change in found if change is not None]
    changes.sort(key=lambda change: change.get("number") or 0, reverse=True)
    return changes
