"""A finished queue item as history rows: one build set and its builds."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from zuul_lite.model import QueueItem, Result

# The reporter's action taken, as the build set's result.
ACTION_RESULTS = {
    "success": Result.SUCCESS,
    "failure": Result.FAILURE,
    "merge-failure": Result.MERGE_CONFLICT,
    "error": Result.ERROR,
}
DEQUEUED = "DEQUEUED"  # taken out without a report (superseded, abandoned, an operator)


@dataclass(slots=True)
class BuildRecord:
    uuid: str
    job_name: str
    node_type: str | None
    result: str | None
    start_time: float | None
    end_time: float | None
    elapsed: float | None
    log_url: str | None
    log_path: str | None
    summary: str
    attempts: int
    position: int

    def to_row(self) -> dict:
        return asdict(self)


@dataclass(slots=True)
class BuildsetRecord:
    uuid: str
    item_uuid: str
    event_id: str
    pipeline: str
    connection: str
    project: str
    branch: str
    change: int
    patchset: int
    ref: str
    newrev: str
    subject: str
    owner: str
    change_url: str
    changes: str
    result: str
    message: str
    merged: bool
    enqueue_time: float
    first_build_start_time: float | None
    last_build_end_time: float | None
    report_time: float
    builds: list[BuildRecord] = field(default_factory=list)

    def to_row(self) -> dict:
        row = asdict(self)
        del row["builds"]
        return row


def item_record(
    item: QueueItem, result: str, merged: bool = False, message: str = ""
) -> BuildsetRecord:
    """The history of `item` as it is reported now: its current build set
    (earlier ones were reset and their builds cancelled) and its builds,
    started or not (a skipped build is history too)."""
    bs = item.buildset
    change = item.change
    builds = [
        BuildRecord(
            uuid=b.uuid,
            job_name=b.job,
            node_type=b.node_type,
            result=b.result,
            start_time=b.start_time,
            end_time=b.end_time,
            elapsed=b.elapsed,
            log_url=b.log_url,
            log_path=b.log_path,
            summary=b.summary or "",
            attempts=b.attempts,
            position=b.index,
        )
        for b in bs.ordered_builds()
    ]
    starts = [b.start_time for b in builds if b.start_time is not None]
    ends = [b.end_time for b in builds if b.end_time is not None]
    return BuildsetRecord(
        uuid=bs.uuid,
        item_uuid=item.uuid,
        event_id=item.event_id,
        pipeline=item.pipeline,
        connection=change.connection,
        project=change.project,
        branch=change.branch,
        change=change.number,
        patchset=change.patchset,
        ref=change.ref,
        newrev=change.newrev,
        subject=change.subject,
        owner=change.owner,
        change_url=change.url,
        changes=" ".join(bs.changes),
        result=str(result),
        message=message,
        merged=merged,
        enqueue_time=item.enqueue_time,
        first_build_start_time=min(starts, default=None),
        last_build_end_time=max(ends, default=None),
        report_time=time.time(),
        builds=builds,
    )
