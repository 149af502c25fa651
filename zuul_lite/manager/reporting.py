"""Reporting an item exactly once, even to a review system outside ZooKeeper.

Before anything reaches the review system, the report is recorded at
`/zuul/reports/<item>` with what it will say and whether the change is to be
merged; the record goes away in the transaction that removes the item. A
scheduler killed in between finds the record on restart, merges only if the
record says the merge has not happened (and the connection's merge is
idempotent for the same commit), and asks the connection whether the report
is already there before making it again. The merge itself runs off the
scheduler thread (the manager's `_land`), between `prepare` and `report`:
the items of a gate run (see `run`) are merged by one push and reported in
one transaction.
An item reported nowhere (a branch
head, which has no change to vote on; an item of a pipeline with no reporter
for how it ended, as post) gets no record: one log line gives each job's result.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from nodepool_lite.exceptions import NodeExistsError
from nodepool_lite.zk import Transaction
from zuul_lite.connections import BuildReport, Report
from zuul_lite.model import Change, MergeState, QueueItem
from zuul_lite.reporter import format_report

if TYPE_CHECKING:
    from zuul_lite.manager import PipelineManager

log = logging.getLogger("zuul_lite.reporting")


class ItemReporter:
    def __init__(self, manager: PipelineManager) -> None:
        self.manager = manager
        self._recorded: set[str] = set()
        self._left: set[str] = set()  # records a previous scheduler left
        # The record of each item being reported, kept between its merge
        # (off the scheduler thread) and its report.
        self._records: dict[str, dict] = {}

    def load(self) -> None:
        self._left = set(self.manager.state.report_uuids())

    def recorded(self, item: QueueItem) -> bool:
        """Whether a report record exists, to be deleted with the item."""
        return item.uuid in self._recorded or item.uuid in self._left

    def forget(self, item: QueueItem) -> None:
        self._recorded.discard(item.uuid)
        self._left.discard(item.uuid)
        self._records.pop(item.uuid, None)

    def action(self, item: QueueItem) -> str:
        if item.error is not None:
            return "error"
        if item.failure is not None:
            return "failure"
        if item.buildset.merge_state == MergeState.CONFLICT:
            return "merge-failure"
        return "success" if item.buildset.succeeded() else "failure"

    def _settings(self, action: str, connection: str) -> dict | None:
        p = self.manager.pipeline
        table = {
            "success": p.success,
            "failure": p.failure,
            "merge-failure": p.merge_failure,
            "error": p.failure,
        }[action]
        return table.get(connection)

    def report_refusal(self, change: Change, sentence: str, event_id: str) -> None:
        """Tell the author why a change did not enter the pipeline (a
        Depends-On cycle, a missing change); once per trigger event."""
        conn = self.manager.sched.connections[change.connection]
        settings = self._settings("failure", change.connection)
        if settings is None:
            return
        report = Report(
            id=f"refused-{event_id}",
            pipeline=self.manager.pipeline.name,
            message=f"zuul-lite {self.manager.pipeline.name} pipeline, change {change.label}: "
            f"not enqueued.\n\n{sentence}",
            verified=settings.get("verified"),
            reason=sentence,
        )
        if not conn.has_report(change, report):
            conn.report(change, report)

    @staticmethod
    def run(item: QueueItem) -> list[QueueItem]:
        """The item and the items behind it that passed on top of it, each on
        top of the one before: what one merge of the last one's state lands."""
        run = [item]
        while True:
            end = run[-1]
            nxt = next(
                (
                    i
                    for i in end.items_behind
                    if i.live
                    and i.error is None
                    and i.failure is None
                    and i.buildset.succeeded()
                    and i.buildset.changes[:-1] == end.buildset.changes
                ),
                None,
            )
            if nxt is None:
                return run
            run.append(nxt)

    def _new_record(self, item: QueueItem) -> dict:
        action = self.action(item)
        settings = self._settings(action, item.change.connection) or {}
        submit = bool(settings.get("submit")) and self.manager.changes_merge
        return {
            "report_id": f"{item.uuid}-{item.buildset.uuid}",
            "action": action,
            "submit": submit,
            # What to merge: the state of the furthest item behind that passed
            # on top of this one, so a run of passed items takes one push
            # instead of one each (its changes land in order).
            "sha": (
                self.run(item)[-1].buildset.head_sha if submit and action == "success" else None
            ),
            "merged": False,
            "merge_error": None,
        }

    def _why_not_report(self, item: QueueItem, action: str) -> str | None:
        """Why the item is reported nowhere (no record, no vote, no merge):
        a branch head has no change to vote on, and a pipeline may have no
        reporter for how the item ended (post has none)."""
        if item.change.is_ref:
            return "a branch head has no change to vote on"
        if self._settings(action, item.change.connection) is None:
            return f"no {action} reporter for connection {item.change.connection}"
        return None

    def _log_unreported(self, item: QueueItem, action: str, why: str) -> None:
        bs = item.buildset
        jobs = ", ".join(f"{b.job} {b.result}" for b in bs.ordered_builds()) or "no jobs"
        detail = item.error or item.failure or bs.merge_error
        self.manager.log.info(
            "Finished %s: %s (%s)%s; not reported: %s",
            item.label,
            action,
            jobs,
            f": {detail}" if detail else "",
            why,
            item=item,
        )

    def prepare(self, item: QueueItem) -> dict | None:
        """The record of the item's report, stored before anything reaches a
        review system outside ZooKeeper; None if the item is reported nowhere
        (said in the log). A record left for an earlier build set of the item
        (it was reset before it was reported) is replaced."""
        cached = self._records.get(item.uuid)
        if cached is not None and self._current(item, cached):
            return cached
        # Any other record is of an earlier build set: not this one's state.
        record = None
        state = self.manager.state
        conn = self.manager.sched.connections[item.change.connection]
        if item.uuid in self._left | self._recorded:  # a report under way
            record = state.get_report(item.uuid)
            if record is not None and not self._current(item, record):
                record = None
        if record is None:
            action = self.action(item)
            why_not = self._why_not_report(item, action)
            if why_not:
                self._log_unreported(item, action, why_not)
                return None
            record = self._new_record(item)
            if not conn.reports_in_transaction:
                path = state.report_path(item.uuid)
                try:
                    state.zk.create(path, record)
                except NodeExistsError:
                    stored = state.get_report(item.uuid)
                    if stored is not None and self._current(item, stored):
                        record = stored
                    else:
                        state.zk.set(path, record)
                self._recorded.add(item.uuid)
        self._records[item.uuid] = record
        return record

    @staticmethod
    def _current(item: QueueItem, record: dict) -> bool:
        """Whether `record` is the report of the item as it is: of its build
        set, and saying the error the item hit since (it raised while being
        reported) unless its change merged already."""
        if record.get("report_id") != f"{item.uuid}-{item.buildset.uuid}":
            return False
        return item.error is None or record["action"] == "error" or record["merged"]

    @staticmethod
    def reason(item: QueueItem, record: dict | None) -> str:
        """Why the item ended as it did, in one sentence; empty when its jobs say it."""
        merge_error = record["merge_error"] if record is not None else None
        return item.error or item.failure or item.buildset.merge_error or merge_error or ""

    @staticmethod
    def must_merge(record: dict) -> bool:
        return bool(record["submit"]) and not record["merged"] and record["merge_error"] is None

    def merged_record(self, item: QueueItem) -> dict | None:
        """The record of the item's current build set if its change merged
        already (landed by the merge of a run ahead of it), else None."""
        record = self._records.get(item.uuid)
        if record is None or not record["merged"]:
            return None
        return record if record["report_id"] == f"{item.uuid}-{item.buildset.uuid}" else None

    def merge_run(self, run: list[tuple[QueueItem, dict]]) -> None:
        """Merge the items of a run in order as their records say, noting
        how each went in its record, up to the first that does not merge.
        The items whose records name the same state (the last one's, see
        `_new_record`) go to their connection's `merge_many` together: one
        push lands them all. Safe off the scheduler thread: the scheduler
        does not touch items while their merge is under way. Raises
        ReviewSystemError when the review system could not be asked (the
        merge is tried again later)."""
        state = self.manager.state
        sched = self.manager.sched
        start = 0
        while start < len(run):
            item, record = run[start]
            conn = sched.connections[item.change.connection]
            group = [(item, record)]
            for other, other_record in run[start + 1 :]:
                if (
                    other.change.connection != item.change.connection
                    or not record.get("sha")
                    or other_record.get("sha") != record["sha"]
                ):
                    break
                group.append((other, other_record))
            # Each change as tested: its own state, an ancestor of the group's.
            shas = [other.buildset.head_sha or "" for other, _ in group[:-1]]
            shas.append(record.get("sha") or group[-1][0].buildset.head_sha or "")
            errors = conn.merge_many(
                [other.change for other, _ in group], shas, sched.merger.merger
            )
            landed = shas[len(errors) - 2] if errors[-1] and len(errors) > 1 else None
            for (other, other_record), error in zip(group, errors, strict=False):
                if error:
                    other_record.update(merge_error=error, action="failure")
                else:
                    other_record["merged"] = True
                    if landed is not None:  # the group's state did not land, this one's did
                        other_record["sha"] = landed
                if not conn.reports_in_transaction:
                    state.zk.set(state.report_path(other.uuid), other_record)
                if error:
                    return
            start += len(group)

    def report(self, item: QueueItem, record: dict | None, txn: Transaction) -> bool:
        """Report the item as its record (from `prepare`, merged already if the
        pipeline merges) says; True if the change merged.

        A connection that reports inside a ZooKeeper transaction (the local
        inbox) adds its vote to `txn`, which also removes the item: exactly
        once with no record, since its merge is idempotent for the same commit.
        Any other is reported through the record described above.
        """
        if record is None:
            return False
        change = item.change
        conn = self.manager.sched.connections[change.connection]
        settings = self._settings(record["action"], change.connection)
        if settings is None:
            why = f"no {record['action']} reporter for connection {change.connection}"
            self._log_unreported(item, record["action"], why)
            return record["merged"]
        verified = settings.get("verified") if record["action"] != "error" else None
        report = Report(
            id=record["report_id"],
            pipeline=self.manager.pipeline.name,
            message=format_report(
                self.manager.pipeline,
                item,
                record["action"],
                merged=record["merged"],
                merge_error=record["merge_error"],
            ),
            verified=verified,
            merged_sha=(record.get("sha") or item.buildset.head_sha) if record["merged"] else None,
            builds=tuple(
                BuildReport(b.job, b.result, b.log_url, b.elapsed, b.summary, b.note)
                for b in item.buildset.ordered_builds()
            ),
            reason=self.reason(item, record),
        )
        if conn.reports_in_transaction:
            conn.report_ops(change, report, txn)
        elif conn.has_report(change, report):
            self.manager.log.info("Report %s was made already", report.id, item=item)
            return record["merged"]
        else:
            conn.report(change, report)
        self.manager.log.info(
            "Reported %s: %s, vote %s%s",
            change.label,
            record["action"],
            verified,
            ", merged" if record["merged"] else "",
            item=item,
        )
        return record["merged"]
