"""Read what the web shows from ZooKeeper: pipeline queues and local inbox changes.

The scheduler and the local inbox own these znodes (doc/architecture.md); the
web only reads them through the `nodepool_lite.zk` facade, so it can run in
its own process and keeps working across scheduler restarts.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

from nodepool_lite.zk import ZooKeeper
from zuul_lite.history.db import HistoryDB, HistoryError
from zuul_lite.model import BuildState
from zuul_lite.state import ZuulState

DAY = 86400.0

log = logging.getLogger("zuul_lite.web")


def read_status(zk: ZooKeeper, history: HistoryDB | None = None) -> dict[str, Any]:
    """The scheduler's view of its queues, plus `now` from the server's clock.

    `now` lets a browser with a skewed clock still show the right elapsed time
    for running builds. The state module owns the znode layout. Each build
    submitted to Gearman gets `running`: whether a launcher has taken it
    (else it still waits in Gearman's queue). With the history: `estimates`,
    the median duration of each shown job's recent successful builds (for
    progress bars), and `time_to_vote` over the last day.
    """
    state = ZuulState(zk)
    status = state.read_status()
    jobs = set()
    for pipeline in status["pipelines"]:
        for item in pipeline["items"]:
            for build in (item.get("buildset") or {}).get("builds", {}).values():
                jobs.add(build.get("job"))
                if build.get("state") == BuildState.QUEUED:
                    build["running"] = state.build_running(build["uuid"])
    if history is not None:
        try:  # the queues still show without the history
            status["estimates"] = {
                job: statistics.median(found)
                for job in sorted(j for j in jobs if j)
                if (found := history.job_durations(job))
            }
            status["time_to_vote"] = time_to_vote(history)
        except HistoryError as error:
            log.warning("Status without history: %s", error)
    return {**status, "now": time.time()}


def percentile(values: list[float], pct: int) -> float | None:
    if len(values) < 2:
        return values[0] if values else None
    return statistics.quantiles(values, n=100, method="inclusive")[pct - 1]


def time_to_vote(history: HistoryDB, pipeline: str | None = None) -> dict[str, Any]:
    """Seconds from enqueue to report over the last day: count, p50 and p95."""
    times = history.vote_times(time.time() - DAY, pipeline)
    return {"count": len(times), "p50": percentile(times, 50), "p95": percentile(times, 95)}


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
