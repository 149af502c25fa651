"""Pipeline managers: the whole life of a queue item, from event to report.

The base manager walks each ChangeQueue front to back carrying the nearest
non-failing item (nnfi), as Zuul's processQueue does: an item whose item
ahead is not the nnfi is re-based onto it and its builds are restarted; that
is the whole gate reset, in one place. `independent` and `dependent` only
override hooks.

Only the scheduler thread calls into a manager. Each state change of an item
is written to ZooKeeper before it is acted upon (a build is stored `queued`
before it is submitted; a report is recorded before it is made), so a
scheduler killed at any line restarts into a state it can finish from.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from nodepool_lite.exceptions import BadVersionError
from nodepool_lite.zk import Transaction
from zuul_lite.baseline import failed_tests_of
from zuul_lite.build_contract import BuildRequest, BuildResult
from zuul_lite.exceptions import EnqueueRefused, ReviewSystemError, ZuulLiteError
from zuul_lite.history.db import HistoryError
from zuul_lite.history.records import ACTION_RESULTS, DEQUEUED, item_record
from zuul_lite.manager.reporting import ItemReporter
from zuul_lite.merger import MergeChange, MergeRequest, MergeResult
from zuul_lite.model import (
    Build,
    BuildSet,
    BuildState,
    Change,
    ChangeQueue,
    MergeState,
    Pipeline,
    QueueItem,
    Result,
    new_uuid,
)

if TYPE_CHECKING:
    from zuul_lite.scheduler import Scheduler

MAX_ATTEMPTS = 3
REPORT_RETRY_MAX = 300.0  # seconds between tries of a report the review system refused
FLUSH_CHUNK = 64


class ItemLog(logging.LoggerAdapter):
    """`[e: <event>]` on every line about an item, so one grep follows a patch."""

    def process(self, msg: str, kwargs: dict) -> tuple[str, dict]:
        item = kwargs.pop("item", None)
        build = kwargs.pop("build", None)
        prefix = f"[e: {item.event_id}] " if item is not None else ""
        if build is not None:
            prefix += f"[build: {build.uuid}] "
        return prefix + msg, kwargs


class PipelineManager:
    """Shared lifecycle; subclasses decide how items relate to each other."""

    changes_merge = False

    def __init__(self, sched: Scheduler, pipeline: Pipeline) -> None:
        self.sched = sched
        self.state = sched.state
        self.pipeline = pipeline
        self.log = ItemLog(logging.getLogger(f"zuul_lite.manager.{pipeline.name}"), {})
        self._merges_requested: dict[str, str] = {}  # item uuid -> build set uuid
        self._merge_failures: dict[str, int] = {}
        # Items whose report the review system did not take: (attempts, not before).
        self._report_retries: dict[str, tuple[int, float]] = {}
        self._new_queues: dict[str, ChangeQueue] = {}  # planned, not yet committed
        # Items planned into a transaction not yet committed, by queue: the
        # trigger events of a wake-up are stored in one (see `plan`).
        self._planned: dict[str, list[QueueItem]] = {}
        self._dirty: dict[str, QueueItem] = {}  # saved in memory, not yet in ZooKeeper
        self._new_builds: list[str] = []  # build znodes the next flush creates
        self._launched: list[tuple[QueueItem, Build]] = []  # to submit after this pass
        # Merges to submit after this pass: the item, the changes it applies, the request.
        self._merge_batch: list[tuple[QueueItem, list[Change], MergeRequest]] = []
        self._landing: set[str] = set()  # items whose merge runs off the scheduler thread
        self._finished: list[QueueItem] = []  # to report at the end of this pass
        self.reporter = ItemReporter(self)

    # Hooks ----------------------------------------------------------------

    def get_change_queue(self, change: Change) -> ChangeQueue:
        raise NotImplementedError

    def on_enqueued(self, item: QueueItem) -> None:
        """After an item is stored (independent: drop older patchsets)."""

    def check_needed_changes(self, item: QueueItem) -> str | None:
        """None while the changes the item needs are merged or ahead of it,
        else the sentence its failure report gives."""
        if not item.change.depends_on:
            return None
        try:
            needed = self.dependencies(item.change)
        except EnqueueRefused as refused:
            return str(refused)
        ahead = {i.change.number for i in item.changes_ahead()}
        for dep in needed:
            if dep.number not in ahead:
                return (
                    f"Change {item.change.number} depends on change {dep.number}, which is "
                    "neither merged nor ahead of it in the queue any more."
                )
        return None

    # Events ---------------------------------------------------------------

    def event_matches(self, event) -> bool:
        return any(f.matches(event) for f in self.pipeline.triggers.get(event.connection, []))

    def find_items(self, number: int) -> list[QueueItem]:
        return [i for i in self.pipeline.all_items() if i.change.number == number]

    def known_items(self) -> list[QueueItem]:
        """The items in the queues and those planned but not committed yet."""
        return [*self.pipeline.all_items(), *(i for p in self._planned.values() for i in p)]

    def has_planned(self, number: int) -> bool:
        return any(i.change.number == number for p in self._planned.values() for i in p)

    def unplan(self, items: list[QueueItem] | None = None) -> None:
        """Forget planned items (all of them by default) whose transaction
        is not committed; the queues they alone would have created too."""
        for name, planned in list(self._planned.items()):
            planned[:] = [i for i in planned if items is not None and i not in items]
            if not planned:
                del self._planned[name]
                self._new_queues.pop(name, None)

    def why_not_enqueue(self, change: Change) -> str | None:
        """None if the change (or branch head) may be enqueued, else one sentence why not."""
        if not change.is_ref and change.status != "NEW":
            return f"Change {change.number} is {change.status.lower()}."
        if not self.sched.layout.jobs_for(change.project, self.pipeline.name):
            return f"Project {change.project} runs no jobs in {self.pipeline.name}."
        for item in self.known_items():
            other = item.change
            if not item.live or other.is_ref != change.is_ref:
                continue
            if change.is_ref and (other.project, other.newrev) == (change.project, change.newrev):
                return (
                    f"{change.ref} of {change.project} at {change.newrev[:12]} is already "
                    f"in {self.pipeline.name}."
                )
            if not change.is_ref and other.label == change.label:
                return f"Change {change.label} is already in {self.pipeline.name}."
        return None

    def dependencies(self, change: Change) -> list[Change]:
        """The open changes `change` needs (Depends-On, recursively), the
        deepest first; EnqueueRefused(report=True) for a cycle, a missing or an
        abandoned change."""
        conn = self.sched.connections[change.connection]
        needed: list[Change] = []

        def visit(current: Change, path: list[int]) -> None:
            for ref in current.depends_on:
                dep = conn.find_change(ref)
                if dep is None:
                    raise EnqueueRefused(
                        f"Change {current.number} says Depends-On: {ref}, which names no change.",
                        report=True,
                    )
                if dep.number in path:
                    cycle = " -> ".join(
                        str(n) for n in [*path[path.index(dep.number) :], dep.number]
                    )
                    raise EnqueueRefused(f"Depends-On cycle: {cycle}.", report=True)
                if dep.status == "MERGED":
                    continue
                if dep.status != "NEW":
                    raise EnqueueRefused(
                        f"Change {current.number} depends on change {dep.number}, which is "
                        f"{dep.status.lower()}.",
                        report=True,
                    )
                visit(dep, [*path, dep.number])
                if all(n.number != dep.number for n in needed):
                    needed.append(dep)

        visit(change, [change.number])
        return needed

    def plan(self, change: Change, event_id: str, txn: Transaction) -> list[QueueItem]:
        """Add the writes that enqueue `change` (and the changes it needs, as
        the manager's kind wants them) to `txn`; the caller commits, then
        calls `enqueue` (or `unplan` if the commit failed). Several changes
        may be planned into one transaction: each is planned behind the
        ones before. Raises EnqueueRefused."""
        why = self.why_not_enqueue(change)
        if why:
            raise EnqueueRefused(why)
        return self.plan_items(self.changes_to_enqueue(change), event_id, txn)

    def changes_to_enqueue(self, change: Change) -> list[tuple[Change, bool]]:
        """(change, live) in queue order: the changes it needs, then itself."""
        raise NotImplementedError

    def plan_items(
        self, changes: list[tuple[Change, bool]], event_id: str, txn: Transaction
    ) -> list[QueueItem]:
        queue = self.get_change_queue(changes[-1][0])
        planned = self._planned.get(queue.name, [])
        before = [*queue.items, *planned]
        items = []
        ahead = before[-1].uuid if before else None
        for change, live in changes:
            item = QueueItem(
                pipeline=self.pipeline.name,
                queue=queue.name,
                change=change,
                event_id=event_id,
                live=live,
            )
            if live:
                item.buildset = self._new_buildset(item, attempt=1)
            position = len(before) + len(items)
            item.active = not queue.window or position < queue.window
            data = item.to_dict()
            data["item_ahead"] = ahead
            ahead = item.uuid
            txn.create(self.state.item_path(self.pipeline.name, item.uuid), data)
            items.append(item)
        stored = {
            **queue.to_dict(),
            "items": [*(i.uuid for i in before), *(i.uuid for i in items)],
        }
        if queue.stored or planned:
            txn.set(self.state.queue_path(self.pipeline.name, queue.name), stored)
        else:
            txn.create(self.state.queue_path(self.pipeline.name, queue.name), stored)
        if queue not in self.pipeline.queues:
            self._new_queues[queue.name] = queue
        self._planned.setdefault(queue.name, []).extend(items)
        return items

    def enqueue(self, items: list[QueueItem], hooks: bool = True) -> None:
        """Put planned items, committed now, into their queue; `hooks`
        False: the caller calls `on_enqueued` once all its items are in."""
        queue = self.pipeline.get_queue(items[0].queue)
        if queue is None:
            queue = self._new_queues.pop(items[0].queue)
            self.pipeline.queues.append(queue)
        queue.stored = True
        planned = self._planned.get(queue.name, [])
        for item in items:
            if item in planned:
                planned.remove(item)
            queue.enqueue(item)
            self.log.info(
                "Enqueued %s as %s item %s in queue %s",
                item.label,
                "live" if item.live else "non-live",
                item.uuid,
                queue.name,
                item=item,
            )
        if not planned:
            self._planned.pop(queue.name, None)
        if hooks:
            self.on_enqueued(items[-1])

    def _new_buildset(self, item: QueueItem, attempt: int) -> BuildSet:
        bs = BuildSet(attempt=attempt)
        for index, job in enumerate(
            self.sched.layout.jobs_for(item.change.project, item.pipeline)
        ):
            bs.builds[job.name] = Build(job=job.name, node_type=job.node_type, index=index)
        return bs

    # Persistence ----------------------------------------------------------

    def save(self, item: QueueItem) -> None:
        """Mark the item for the next `flush`: all of a loop pass's changes go to
        ZooKeeper in one transaction. Before anything leaves the scheduler (a
        build submitted, builds cancelled), `flush` is called first."""
        self._dirty[item.uuid] = item

    def flush(self) -> None:
        if not self._dirty:
            return
        dirty, self._dirty = self._dirty, {}
        builds, self._new_builds = self._new_builds, []
        pending = list(dirty.items())
        try:
            while pending:
                # A few items a transaction: ZooKeeper caps a request at 1 MB.
                chunk, pending = pending[:FLUSH_CHUNK], pending[FLUSH_CHUNK:]
                txn = self.state.transaction()
                for uuid, item in chunk:
                    txn.set(self.state.item_path(self.pipeline.name, uuid), item.to_dict())
                for uuid in builds:
                    txn.create(self.state.build_path(uuid))
                builds = []
                txn.commit()
        except Exception:
            self._dirty.update(dict(chunk + pending))  # written on the next flush
            self._new_builds.extend(builds)
            raise

    def save_queue(self, queue: ChangeQueue, txn: Transaction | None = None) -> None:
        path = self.state.queue_path(self.pipeline.name, queue.name)
        if txn is not None:
            txn.set(path, queue.to_dict())
        else:
            self.state.zk.set(path, queue.to_dict())

    def load(self) -> None:
        """Adopt the queues and items a previous scheduler left in ZooKeeper,
        in the same order and on the same items ahead."""
        self.state.ensure_pipeline(self.pipeline.name)
        self.reporter.load()
        stored_queues, stored_items = self.state.load_pipeline(self.pipeline.name)
        items = {}
        for uuid, data in stored_items.items():
            if data.get("model_api", 1) < 2:
                stored_queues.append(self._upgrade_v1(data))
            items[uuid] = QueueItem.from_dict(data)
        placed = set()
        for data in stored_queues:
            queue = self._queue_from_dict(data)
            for uuid in data.get("items", []):
                item = items.get(uuid)
                if item is None or uuid in placed:
                    continue
                placed.add(uuid)
                queue.items.append(item)
            for item in queue.items:
                ahead = items.get(item.ahead_uuid or "")
                if ahead is not None and ahead in queue.items:
                    item.item_ahead = ahead
                    ahead.items_behind.append(item)
            if queue.items:
                self.pipeline.queues.append(queue)
                self.log.info("Resumed queue %s: %d item(s)", queue.name, len(queue.items))
            else:
                self.state.zk.delete(self.state.queue_path(self.pipeline.name, queue.name))
        for uuid in items:
            if uuid not in placed:
                self.log.warning("Item %s had no queue; dropping it", uuid)
                self.state.zk.delete(self.state.item_path(self.pipeline.name, uuid))

    def _upgrade_v1(self, data: dict) -> dict:
        """An item stored by MODEL_API 1 (check only, no queues): give it a
        queue of its own and start it over, so an upgrade loses no change."""
        change = Change(
            connection=data["connection"],
            project=data["project"],
            branch=data["branch"],
            number=data["change"],
            patchset=data["patchset"],
            subject=data.get("subject", ""),
            owner=data.get("owner", ""),
        )
        queue = self.get_change_queue(change)
        item = QueueItem(
            pipeline=self.pipeline.name,
            queue=queue.name,
            change=change,
            event_id=data.get("event_id", ""),
            uuid=data["uuid"],
            enqueue_time=data.get("enqueue_time", 0.0),
        )
        item.buildset = self._new_buildset(item, attempt=1)
        data.clear()
        data.update(item.to_dict())
        stored = {**queue.to_dict(), "items": [item.uuid]}
        txn = self.state.transaction()
        txn.set(self.state.item_path(self.pipeline.name, item.uuid), data)
        txn.create(self.state.queue_path(self.pipeline.name, queue.name), stored)
        txn.commit()
        self.log.info("Upgraded item %s from MODEL_API 1", item.uuid, item=item)
        return stored

    def _queue_from_dict(self, data: dict) -> ChangeQueue:
        queue = self.new_queue(data["name"], dynamic=data.get("dynamic", False))
        if data.get("window") is not None:
            queue.window = data["window"]
        queue.stored = True
        return queue

    def new_queue(self, name: str, dynamic: bool = False) -> ChangeQueue:
        p = self.pipeline
        return ChangeQueue(
            pipeline=p.name,
            name=name,
            window=0 if dynamic else p.window,
            window_floor=p.window_floor,
            window_increase_type=p.window_increase_type,
            window_increase_factor=p.window_increase_factor,
            window_decrease_type=p.window_decrease_type,
            window_decrease_factor=p.window_decrease_factor,
            dynamic=dynamic,
        )

    # Processing -----------------------------------------------------------

    def process(self) -> bool:
        """One pass over every queue; True if anything changed (pass again)."""
        changed = False
        for queue in list(self.pipeline.queues):
            nnfi: QueueItem | None = None
            for item in list(queue.items):
                if item not in queue.items:
                    continue  # removed while an item ahead was processed
                try:
                    nnfi, item_changed = self._process_item(queue, item, nnfi)
                except Exception as error:  # one item must never stop the loop
                    self.log.exception("Item %s raised", item.uuid, item=item)
                    self._fail_item(item, error)
                    item_changed = True
                changed = changed or item_changed
        changed = self._report_finished() or changed
        self._submit_merges()
        self._submit_launched()
        return changed

    def _process_item(
        self, queue: ChangeQueue, item: QueueItem, nnfi: QueueItem | None
    ) -> tuple[QueueItem | None, bool]:
        changed = False
        if not item.live:
            # Only there to be applied under the items behind it.
            if not item.items_behind:
                self.remove_item(item)
                return nnfi, True
            return nnfi, False
        ahead = item.item_ahead
        if ahead is not None and not ahead.live:
            ahead = None  # tested on top of it, but not waiting for it
        if ahead is not nnfi:
            old = item.item_ahead
            moved = queue.move(item, nnfi)
            self.log.info(
                "Item %s re-based from %s onto %s",
                item.label,
                old.label if old else "the branch head",
                nnfi.label if nnfi else "the branch head",
                item=item,
            )
            for other in moved:
                self.reset_item(other) if other is item else self.save(other)
            changed = True
        actionable = queue.is_actionable(item)
        if item.active != actionable:
            item.active = actionable
            self.save(item)
        bs = item.buildset
        if item.error is None and item.failure is None:
            item.failure = self.check_needed_changes(item)
            if item.failure is not None:
                self.save(item)
        if item.error is not None or item.failure is not None:
            self._report_and_dequeue(item, queue, reset_behind=True)
            return nnfi, True
        if bs.merge_state == MergeState.CONFLICT:
            # A series that does not apply is reported at once, wherever it is.
            self.log.info("Merge of %s failed: %s", item.label, bs.merge_error, item=item)
            self._report_and_dequeue(item, queue, reset_behind=True)
            return nnfi, True
        if actionable:
            if bs.merge_state == MergeState.PENDING:
                self._request_merge(item)
            elif bs.merged:
                changed = self._run_builds(item) or changed
        failing = bs.any_failed()
        if ahead is None and bs.merged and bs.all_done():
            self._report_and_dequeue(item, queue, reset_behind=failing)
            if item not in queue.items:
                return nnfi, True
            # Still there: being merged, or waiting to report again.
        if not failing:
            nnfi = item
        return nnfi, changed

    def _report_and_dequeue(
        self, item: QueueItem, queue: ChangeQueue, reset_behind: bool = False
    ) -> None:
        """Report, then remove the item (Zuul's window grows on a merge). A
        review system in ZooKeeper gets its vote in the transaction that
        removes the item; if the change was written meanwhile, do it again.
        While a review system that refused the report waits for its retry,
        the item stays (and the items behind it in a gate queue wait). A
        change to merge is merged off this thread first (see `_land`); the
        items merged with it behind it are reported and removed in the same
        transaction (see `_merged_behind`). An item alone in its queue (an
        independent pipeline's) waits for the end of the pass, to be
        reported with every other one finished in it (see `_report_finished`)."""
        if not self.changes_merge and not item.items_behind:
            if self._may_report(item):
                self._finished.append(item)
            return
        self._report_now(item, queue, reset_behind)

    def _report_now(self, item: QueueItem, queue: ChangeQueue, reset_behind: bool) -> None:
        if not self._may_report(item):
            return
        record = self.reporter.prepare(item)
        if record is not None and self.reporter.must_merge(record):
            self._land(item)
            return
        self._report_batch(
            [(item, record), *self._merged_behind(item, record)], queue, reset_behind
        )

    def _report_finished(self) -> bool:
        """Report the items of independent queues finished in this pass: one
        history transaction and one ZooKeeper transaction for all of them
        (a burst of changes gets its votes in a few, not one each)."""
        finished, self._finished = self._finished, []
        batch = []
        changes = set()
        for item in finished:
            # Two items of one change (its vote is one versioned write) go in
            # two transactions: the other one is reported in the next pass.
            change = (item.change.connection, item.change.number, item.change.newrev)
            if change in changes:
                continue
            changes.add(change)
            if self._queued(item) and self._may_report(item):
                try:
                    batch.append((item, self.reporter.prepare(item)))
                except Exception as error:  # one item must never stop the others' reports
                    self.log.exception("Item %s raised", item.uuid, item=item)
                    self._fail_item(item, error)
        try:
            self._report_batch(batch, None, reset_behind=False)
        except Exception:
            labels = ", ".join(item.label for item, _ in batch)
            self.log.exception("Reporting %s raised; each alone now", labels)
            for item, _ in batch:
                if self._queued(item):
                    try:
                        self._report_now(item, self.pipeline.get_queue(item.queue), False)
                    except Exception as error:
                        self._fail_item(item, error)
        return bool(finished)

    def _queued(self, item: QueueItem) -> bool:
        queue = self.pipeline.get_queue(item.queue)
        return queue is not None and item in queue.items

    def _report_batch(
        self,
        batch: list[tuple[QueueItem, dict | None]],
        queue: ChangeQueue | None,
        reset_behind: bool,
    ) -> None:
        """Record the items in the history, report them and remove them, in
        one transaction. `queue`: the gate queue of an ordered run (the
        first item, then the items merged behind it), where a report the
        review system refuses stops the run; None: items of queues of their own."""
        if not batch:
            return
        if not self._record_history(batch):
            return
        while True:
            txn = self.state.transaction()
            reported = []
            changes = [(other.change.connection, other.change.number) for other, _ in batch]
            with self.sched.preloaded_changes(changes):
                for other, other_record in batch:
                    try:
                        reported.append((other, self.reporter.report(other, other_record, txn)))
                    except ReviewSystemError as error:
                        self._report_later(other, error)
                        if queue is not None:
                            break
            if not reported:
                return
            window = queue.window if queue is not None else None
            merged = all(m for _, m in reported)
            if queue is not None and self.changes_merge and not batch[0][0].error:
                for _, m in reported:
                    queue.increase_window() if m else queue.decrease_window()
            try:
                self.remove_items(
                    [other for other, _ in reported],
                    reset_behind or (self.changes_merge and not merged),
                    txn=txn,
                )
            except BadVersionError:
                if queue is not None:
                    queue.window = window
                continue
            now = time.time()
            records = dict((other.uuid, r) for other, r in batch)
            for other, _ in reported:
                record = records[other.uuid]
                action = record["action"] if record is not None else self.reporter.action(other)
                self.sched.metrics.item_reported(other, action, now)
            return

    def _may_report(self, item: QueueItem) -> bool:
        """Not while its merge runs, nor before a refused report's retry is due."""
        _, not_before = self._report_retries.get(item.uuid, (0, 0.0))
        return time.monotonic() >= not_before and item.uuid not in self._landing

    def _merged_behind(self, item: QueueItem, record: dict | None) -> list[tuple[QueueItem, dict]]:
        """The items right behind a merged item that were merged with it (one
        push of the last one's state landed them all, see `_land`): each has
        a merged record for its current build set, so it passed on top of
        the one ahead of it. Reported with it in one transaction."""
        if not self.changes_merge or record is None or not record["merged"]:
            return []
        queue = self.pipeline.get_queue(item.queue)
        found = []
        for other in queue.items[queue.items.index(item) + 1 :]:
            merged = self.reporter.merged_record(other)
            if merged is None or not self._may_report(other):
                break
            found.append((other, merged))
        return found

    def _record_history(self, batch: list[tuple[QueueItem, dict | None]]) -> bool:
        """Write the items' build sets and builds to SQL as they are reported,
        before the transaction that removes them from ZooKeeper: a scheduler
        killed in between finds them again and writes the same rows again
        (keyed by uuid), so nothing is lost or doubled. A database that
        refuses is retried like a review system that does (the items wait)."""
        records = []
        for item, record in batch:
            action = record["action"] if record is not None else self.reporter.action(item)
            merged = bool(record and record["merged"])
            reason = self.reporter.reason(item, record)
            records.append(item_record(item, ACTION_RESULTS[action], merged, reason))
        try:
            self.sched.history.record_many(records)
        except HistoryError as error:
            for item, _ in batch:
                self._report_later(item, error)
            return False
        return True

    def _land(self, item: QueueItem) -> None:
        """Merge the item, and the items that passed behind it on top of it,
        off the scheduler thread: a push or a submit takes tens of
        milliseconds, in which builds of other items can be launched. One
        merge of the last one's state lands them all (one push to the local
        inbox); their reports then follow in one transaction, in the pass
        after. Items being merged are neither dequeued nor moved meanwhile."""
        run = []
        for other in self.reporter.run(item):
            record = self.reporter.prepare(other)
            if record is None or not self.reporter.must_merge(record):
                break
            run.append((other, record))
        self._landing.update(other.uuid for other, _ in run)
        self.log.debug("Merging %s", ", ".join(o.label for o, _ in run), item=item)

        def merge_all() -> None:
            refused: ReviewSystemError | None = None
            try:
                self.reporter.merge_run(run)
            except ReviewSystemError as error:
                refused = error
            except Exception as error:  # a bug must not leave the items stuck
                self.log.exception("Merging %s raised", item.label, item=item)
                for _, record in run:
                    if not record["merged"]:
                        record.update(
                            merge_error=f"Merging failed ({type(error).__name__}: {error}).",
                            action="failure",
                        )
                        break
            # The items behind the first that did not merge are not merged:
            # they are re-tested.
            self.sched.post_callback(lambda: self._landed(run, refused))

        self.sched.landing.post(merge_all)

    def _landed(
        self, run: list[tuple[QueueItem, dict]], refused: ReviewSystemError | None
    ) -> None:
        for other, _ in run:
            self._landing.discard(other.uuid)
        if refused is not None:
            self._report_later(run[0][0], refused)

    def remove_item(
        self, item: QueueItem, reset_behind: bool = False, txn: Transaction | None = None
    ) -> None:
        self.remove_items([item], reset_behind, txn)

    def remove_items(
        self, items: list[QueueItem], reset_behind: bool = False, txn: Transaction | None = None
    ) -> None:
        """Take items out of their queues and ZooKeeper (in `txn`, with what
        the caller put there); then cancel what they run. The items behind
        them that stay are reset (`reset_behind`) or saved re-based."""
        txn = txn or self.state.transaction()
        gone = {item.uuid for item in items}
        queues: list[ChangeQueue] = []
        for item in items:
            txn.delete(self.state.item_path(self.pipeline.name, item.uuid))
            if self.reporter.recorded(item):
                txn.delete(self.state.report_path(item.uuid))
            queue = self.pipeline.get_queue(item.queue)
            if queue is not None and queue not in queues:
                queues.append(queue)
        for queue in queues:
            rest = [i for i in queue.items if i.uuid not in gone]
            if rest:
                stored = {**queue.to_dict(), "items": [i.uuid for i in rest]}
                txn.set(self.state.queue_path(self.pipeline.name, queue.name), stored)
            else:
                txn.delete(self.state.queue_path(self.pipeline.name, queue.name))
        txn.commit()
        # ZooKeeper has it: now the memory, and then what runs.
        behind: dict[str, QueueItem] = {}
        for item in items:
            self._dirty.pop(item.uuid, None)
            queue = self.pipeline.get_queue(item.queue)
            if queue is not None and item in queue.items:
                behind.update((other.uuid, other) for other in queue.dequeue(item))
        for queue in queues:
            if not queue.items:
                self.pipeline.queues.remove(queue)
        for item in items:
            self.cancel_builds(item)
            self.reporter.forget(item)
        for other in behind.values():
            if other.uuid not in gone:
                self.reset_item(other) if reset_behind else self.save(other)
        for item in items:
            self._forget(item)

    def dequeue(self, item: QueueItem, why: str) -> None:
        """Drop an item without a report (superseded, abandoned, an operator);
        not while it is being merged, since its commits may have landed."""
        if item.uuid in self._landing:
            self.log.warning("Not dequeued (%s): %s is being merged", why, item.label, item=item)
            return
        started = [
            b.job
            for b in item.buildset.ordered_builds()
            if b.state in (BuildState.QUEUED, BuildState.COMPLETED)
        ]
        self.log.info("Dequeued %s: %s", item.label, why, item=item)
        if started:
            try:  # history, not a vote: a database away does not keep the item
                self.sched.history.record(item_record(item, DEQUEUED, message=why))
            except HistoryError as error:
                self.log.warning("Dequeue of %s not in the history: %s", item.label, error)
        self.remove_item(item, reset_behind=True)
        if started and item.live and not item.change.is_ref:
            conn = self.sched.connections[item.change.connection]
            conn.on_dequeued(item.change, self.pipeline.name, started, why)

    def _report_later(self, item: QueueItem, error: ZuulLiteError) -> None:
        """The review system (or the history database) did not take the
        report: keep the item and try again after a backoff (2 s doubling
        up to 5 min), for as long as it takes."""
        attempts = self._report_retries.get(item.uuid, (0, 0.0))[0] + 1
        delay = min(2.0 * 2 ** (attempts - 1), REPORT_RETRY_MAX)
        self._report_retries[item.uuid] = (attempts, time.monotonic() + delay)
        self.log.warning(
            "Could not report %s (attempt %d): %s Trying again in %.0f s.",
            item.label, attempts, error, delay, item=item,
        )  # fmt: skip
        self.sched.call_later(delay, lambda: None)  # a pass when it is due

    def _fail_item(self, item: QueueItem, error: Exception) -> None:
        """An item that raised is reported with one sentence and removed."""
        item.error = (
            f"zuul-lite hit an internal error on this change ({type(error).__name__}: {error})."
        )
        try:
            queue = self.pipeline.get_queue(item.queue)
            self._report_now(item, queue, reset_behind=True)
        except Exception:
            self.log.exception("Could not report item %s; dropping it", item.uuid, item=item)
            try:
                self.remove_item(item, reset_behind=True)
            except Exception:
                self.log.exception("Could not remove item %s", item.uuid, item=item)
                queue = self.pipeline.get_queue(item.queue)
                if queue is not None and item in queue.items:
                    queue.dequeue(item)

    # Build sets and merges --------------------------------------------------

    def reset_item(self, item: QueueItem) -> None:
        """Start the item over: cancel its builds, new build set, new merge;
        and every item behind it, which was tested on top of it (Zuul's
        cancelJobs with prime)."""
        for behind in item.items_behind:
            self.reset_item(behind)
        self._merges_requested.pop(item.uuid, None)
        old = item.buildset
        item.buildset = self._new_buildset(item, attempt=old.attempt + 1)
        self.save(item)
        self.flush()  # a restart must not find the builds about to be cancelled
        self.cancel_builds(item, old)
        self._delete_finished_builds(old)

    def cancel_builds(self, item: QueueItem, bs: BuildSet | None = None) -> None:
        bs = bs or item.buildset
        for build in bs.builds.values():
            if build.state == BuildState.QUEUED:
                self.log.info("Cancelling build %s", build.job, item=item, build=build)
                self.sched.cancel_build(build.uuid)
        if bs.git_ref:
            self.sched.merger.forget(item.change.project, bs.git_ref)

    def _request_merge(self, item: QueueItem) -> None:
        bs = item.buildset
        if self._merges_requested.get(item.uuid) == bs.uuid:
            return
        ahead = item.changes_ahead()
        # Apply onto the state the nearest live item ahead is tested on (its
        # ref: the merger serves requests in order, so a merge requested for it
        # is published before this one runs); the ones between (non-live, in
        # check) are applied again.
        base, rest = None, ahead
        for index in range(len(ahead) - 1, -1, -1):
            other = ahead[index]
            if other.live:
                if other.buildset.merged:
                    base = other.buildset.head_sha
                elif self._merges_requested.get(other.uuid) == other.buildset.uuid:
                    base = self.ref_for(other)
                else:
                    return  # its merge is requested first; this one follows
                rest = ahead[index + 1 :]
                break
        changes = [*(i.change for i in ahead), item.change]
        apply = [*(i.change for i in rest), item.change]
        if item.change.is_ref:
            # A branch head is tested as it is: published at exactly its commit.
            base, changes, apply = item.change.newrev, [], []
        bs.changes = [c.label for c in changes]
        self._merges_requested[item.uuid] = bs.uuid
        # Submitted together at the end of the pass, with their series read then.
        self._merge_batch.append(
            (
                item,
                apply,
                MergeRequest(
                    item_uuid=item.uuid,
                    project=item.change.project,
                    branch=item.change.branch,
                    ref=self.ref_for(item),
                    changes=[],
                    base=base,
                    base_changes=[i.change.label for i in ahead[: len(ahead) - len(rest)]],
                    review_repo=self.sched.connections[item.change.connection].branch_repo(
                        item.change.project
                    ),
                    event_id=item.event_id,
                ),
            )
        )

    def _submit_merges(self) -> None:
        """The merges a pass asked for, in queue order, at once: the merger
        then applies a queue's chained series in one run. Their series are
        read together (one git process for the local inbox), each once; an
        item whose series cannot be read is reported with one sentence."""
        if not self._merge_batch:
            return
        batch, self._merge_batch = self._merge_batch, []
        series = self._read_series([c for _, apply, _ in batch for c in apply])
        requests = []
        for item, apply, request in batch:
            read = [series[(c.connection, c.label)] for c in apply]
            error = next((r for r in read if isinstance(r, Exception)), None)
            if error is not None:
                self.log.error("Reading the series of %s failed: %s", item.label, error, item=item)
                self._fail_item(item, error)
                continue
            changes = [MergeChange(c.label, r) for c, r in zip(apply, read, strict=True)]
            requests.append(replace(request, changes=changes))
        self.sched.merger.submit_many(requests)

    def _read_series(self, changes: list[Change]) -> dict[tuple[str, str], bytes | Exception]:
        """(connection, label) -> the series, or the error reading it raised;
        read per connection at once."""
        found: dict[tuple[str, str], bytes | Exception] = {}
        by_conn: dict[str, dict[str, Change]] = {}
        for change in changes:
            by_conn.setdefault(change.connection, {})[change.label] = change
        for name, group in by_conn.items():
            try:
                read = self.sched.connections[name].get_series_many(list(group.values()))
            except Exception as error:  # each item says it
                read = [error] * len(group)
            found.update(((name, label), blob) for label, blob in zip(group, read, strict=True))
        return found

    def merges_pending(self) -> int:
        return len(self._merges_requested)

    def ref_for(self, item: QueueItem) -> str:
        c = item.change
        return f"refs/zuul/{item.pipeline}/{c.number}/{c.patchset}/{item.buildset.uuid}"

    def on_merged(self, item: QueueItem, result: MergeResult) -> None:
        bs = item.buildset
        if result.ref != self.ref_for(item) or bs.merge_state != MergeState.PENDING:
            return  # a merge for a build set that was reset meanwhile
        self._merges_requested.pop(item.uuid, None)
        if result.internal:
            self._merge_failed(item, bs.uuid, result.error or "unknown error")
            return
        self._merge_failures.pop(item.uuid, None)
        # The base of the item's own series: what checkpatch and warning
        # diffs compare against.
        own = list(result.commits)
        bs.base_sha = result.commits[own[-2]] if len(own) > 1 else result.base_sha
        if result.error:
            if result.failed_change and result.failed_change != item.label:
                # A change ahead does not apply: it is dequeued and this item
                # is then re-based, so this result is moot.
                self.log.info("A change ahead does not apply: %s", result.error, item=item)
                return
            bs.merge_state = MergeState.CONFLICT
            bs.merge_error = result.error
            for build in bs.builds.values():
                build.state, build.result = BuildState.SKIPPED, Result.SKIPPED
        else:
            bs.merge_state = MergeState.COMPLETE
            bs.git_ref = result.ref
            bs.head_sha = result.head_sha
        self.save(item)

    def _merge_failed(self, item: QueueItem, bs_uuid: str, error: str) -> None:
        """Our merger failed (not a conflict): try again a little later, and
        after MAX_ATTEMPTS report the item without a vote instead of leaving
        it merging forever."""
        count = self._merge_failures.get(item.uuid, 0) + 1
        self._merge_failures[item.uuid] = count
        if count >= MAX_ATTEMPTS:
            self.log.error("Merger failed %d times: %s", count, error, item=item)
            item.error = f"The merger failed {count} times on this change: {error}"
            self._merges_requested.pop(item.uuid, None)
            self.save(item)
            return
        self.log.warning("Merger error, retrying: %s", error, item=item)
        self._merges_requested[item.uuid] = bs_uuid  # no new request until the timer

        def retry() -> None:
            if self._merges_requested.get(item.uuid) == bs_uuid:
                del self._merges_requested[item.uuid]  # the next pass asks again

        self.sched.call_later(2.0 * count, retry)

    # Builds -------------------------------------------------------------------

    def _dependency_failed(self, bs: BuildSet, build: Build) -> str | None:
        job = self.sched.layout.jobs.get(build.job)
        for dep in job.dependencies if job else []:
            dep_build = bs.builds.get(dep)
            if dep_build and dep_build.done and dep_build.result != Result.SUCCESS:
                return dep
        return None

    def _ready(self, bs: BuildSet, build: Build) -> bool:
        job = self.sched.layout.jobs.get(build.job)
        return all(
            bs.builds[d].result == Result.SUCCESS
            for d in (job.dependencies if job else [])
            if d in bs.builds
        )

    def _run_builds(self, item: QueueItem) -> bool:
        changed = False
        bs = item.buildset
        for build in bs.ordered_builds():
            if build.state != BuildState.WAITING:
                continue
            dep = self._dependency_failed(bs, build)
            if dep:
                build.state, build.result = BuildState.SKIPPED, Result.SKIPPED
                build.summary = f"Not run: {dep} did not succeed."
                self.save(item)
                changed = True
            elif self._ready(bs, build):
                self._launch(item, build)
                changed = True
        return changed

    def _launch(self, item: QueueItem, build: Build) -> None:
        job = self.sched.layout.jobs.get(build.job)
        if job is None:
            build.state, build.result = BuildState.COMPLETED, Result.FAILURE
            build.summary = f"Job {build.job} is no longer defined in the layout."
            self.save(item)
            return
        c = item.change
        if job.trusted and not c.is_ref:
            # The layout keeps trusted jobs out of pipelines that take changes;
            # this holds even for an item an operator put into a trusted one.
            build.state, build.result = BuildState.COMPLETED, Result.ERROR
            build.summary = (
                f"Job {job.name} is trusted (it writes caches other builds read), so it runs "
                f"only on merged branch heads, never on change {c.label}."
            )
            self.log.error("%s not run: %s", build.job, build.summary, item=item, build=build)
            self.save(item)
            return
        build.attempts += 1
        build.start_time = time.time()
        # Zuul's log layout: a change's builds under its number, a ref's under its commit.
        where = f"{c.newrev[:2]}/{c.newrev}" if c.is_ref else f"{c.number}/{c.patchset}"
        build.log_path = f"{where}/{item.pipeline}/{build.job}/{build.uuid}"
        if job.noop:
            build.state, build.result = BuildState.COMPLETED, Result.SUCCESS
            build.end_time = build.start_time
            build.elapsed = 0.0
            self.sched.metrics.build_finished(item.pipeline, build)
            self.save(item)
            return
        build.state = BuildState.QUEUED
        self.save(item)
        self._new_builds.append(build.uuid)
        self._launched.append((item, build))  # submitted at the end of the pass

    def _submit_launched(self) -> None:
        """Submit the builds a pass launched, after one flush has stored them
        all `queued` (and made their znodes): a restart finds each of them."""
        if not self._launched:
            return
        self.flush()
        launched, self._launched = self._launched, []
        for item, build in launched:
            queue = self.pipeline.get_queue(item.queue)
            current = (
                queue is not None
                and item in queue.items
                and item.buildset.builds.get(build.job) is build
            )
            if not current or build.state != BuildState.QUEUED:
                # Reset or removed in the same pass: never submitted.
                self.sched.delete_build_later(build.uuid)
                continue
            self.sched.watch_build(build.uuid, created=True)
            self.sched.submit_build(self.build_request(item, build))
            self.log.info("Submitted %s", build.job, item=item, build=build)
            if not item.change.is_ref:
                log_url = f"{self.sched.config.log_url.rstrip('/')}/{build.log_path}/"
                conn = self.sched.connections[item.change.connection]
                conn.on_build_started(item.change, item.pipeline, build.job, log_url)

    def build_request(self, item: QueueItem, build: Build) -> BuildRequest:
        job = self.sched.layout.jobs[build.job]
        bs = item.buildset
        c = item.change
        return BuildRequest(
            uuid=build.uuid,
            job=job.name,
            node_type=job.node_type or "",
            log_path=build.log_path or "",
            project=c.project,
            branch=c.branch,
            change=c.number,
            patchset=c.patchset,
            pipeline=item.pipeline,
            event_id=item.event_id,
            git_ref=bs.git_ref,
            git_url=self.sched.config.git_url + c.project,
            base_ref=bs.base_sha,
            changes=" ".join(bs.changes),
            vars=job.vars,
            timeout=job.timeout,
            playbooks={"pre": job.pre_run, "run": job.run, "post": job.post_run},
            artifacts={
                d: bs.builds[d].log_path
                for d in job.dependencies
                if d in bs.builds and bs.builds[d].log_path
            },
            failure_output=job.failure_output,
            checkout=job.checkout,
            subject=c.subject,
            owner=c.owner,
            ref=c.ref,
            newrev=c.newrev,
            review_repo=self.sched.connections[c.connection].branch_repo(c.project),
            baseline=self.sched.baselines.for_build(item, build),
        )

    def on_build_completed(self, item: QueueItem, build: Build, result: BuildResult) -> None:
        if build.state != BuildState.QUEUED:
            return
        job = self.sched.layout.jobs.get(build.job)
        rerun = job is not None and job.rerun_on_failure
        if rerun and result.result == Result.FAILURE and build.first_result is None:
            self._rerun(item, build, result)
            return
        if rerun and result.result in (Result.SUCCESS, Result.FAILURE):
            # Counted before the result is taken: a count retried after an
            # error or a restart finds this uuid counted already.
            flipped = build.first_result is not None and result.result == Result.SUCCESS
            if flipped:
                failing = set(failed_tests_of(result.findings))
                build.flaky_tests = [t for t in build.first_failed_tests if t not in failing]
            self.state.count_flake(
                item.change.project, build.job, build.uuid, flipped, build.flaky_tests
            )
        build.state = BuildState.COMPLETED
        build.result = result.result
        build.log_url = result.log_url
        build.summary = result.summary or ""
        build.note = self.sched.baselines.on_result(self.pipeline, item, build, result)
        build.end_time = time.time()
        build.elapsed = result.elapsed
        if build.elapsed is None and build.start_time:
            build.elapsed = build.end_time - build.start_time
        self.log.info("%s: %s", build.job, build.result, item=item, build=build)
        self.sched.metrics.build_finished(item.pipeline, build)
        self.save(item)

    def _rerun(self, item: QueueItem, build: Build, result: BuildResult) -> None:
        """A rerun-on-failure job failed for the first time: run it once more,
        under a new uuid (so on a fresh node); the rerun's result is the
        build's. Until then the build is not failing, so a gate queue is not
        reset for it."""
        old = build.uuid
        build.first_result = result.result
        build.first_log_url = result.log_url
        build.first_failed_tests = failed_tests_of(result.findings)
        build.rerun_of = old
        build.result = result.result
        build.elapsed = result.elapsed
        self.sched.metrics.build_finished(item.pipeline, build)
        build.uuid = new_uuid()
        build.state = BuildState.WAITING
        build.result = None
        build.log_url = None
        build.summary = ""
        build.elapsed = None
        build.early_failure = False
        self.log.info(
            "%s: %s; running it once more as %s before it counts",
            build.job,
            result.result,
            build.uuid,
            item=item,
            build=Build(job=build.job, node_type=None, uuid=old),
        )
        self.save(item)
        self.sched.delete_build_later(old)

    def on_build_lost(self, item: QueueItem, build: Build, why: str) -> None:
        """No launcher runs it and it has no result: run it again on a new node,
        under a new uuid so a late result of the lost one is never taken."""
        if build.state != BuildState.QUEUED:
            return
        old = build.uuid
        if build.attempts >= MAX_ATTEMPTS:
            build.state, build.result = BuildState.COMPLETED, Result.RETRY_LIMIT
            build.summary = f"Gave up after {build.attempts} attempts: {why}"
            build.end_time = time.time()
            self.log.warning("%s: RETRY_LIMIT (%s)", build.job, why, item=item, build=build)
            self.sched.metrics.build_finished(item.pipeline, build)
        else:
            build.uuid = new_uuid()
            build.state = BuildState.WAITING
            build.early_failure = False
            self.log.warning(
                "%s was lost (%s); retrying as %s",
                build.job,
                why,
                build.uuid,
                item=item,
                build=Build(job=build.job, node_type=None, uuid=old),
            )
        self.save(item)
        self.sched.delete_build_later(old)

    def on_early_failure(self, item: QueueItem, build: Build, reason: str) -> None:
        if build.state != BuildState.QUEUED or build.early_failure:
            return
        job = self.sched.layout.jobs.get(build.job)
        if job is not None and job.rerun_on_failure and build.first_result is None:
            # A failure is run again before it counts: the rerun decides.
            self.log.info(
                "%s will fail (%s); it is run once more first", build.job, reason,
                item=item, build=build,
            )  # fmt: skip
            return
        build.early_failure = True
        self.log.info("%s will fail: %s", build.job, reason, item=item, build=build)
        self.save(item)

    def _forget(self, item: QueueItem) -> None:
        self._merges_requested.pop(item.uuid, None)
        self._merge_failures.pop(item.uuid, None)
        self._report_retries.pop(item.uuid, None)
        self._delete_finished_builds(item.buildset)

    def _delete_finished_builds(self, bs: BuildSet) -> None:
        """Their results are in the item; a cancelled one is deleted when its
        result (or its launcher's going) arrives."""
        for build in bs.builds.values():
            if build.state == BuildState.COMPLETED and build.node_type is not None:
                self.sched.delete_build_later(build.uuid)
