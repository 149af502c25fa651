"""The dependent manager (gate): one shared queue per project, each item
tested on top of every item ahead, merged in order."""

from __future__ import annotations

from zuul_lite.exceptions import EnqueueRefused
from zuul_lite.manager import PipelineManager
from zuul_lite.model import Change, ChangeQueue, QueueItem


class DependentPipelineManager(PipelineManager):
    changes_merge = True

    def why_not_enqueue(self, change: Change) -> str | None:
        if change.is_ref:
            return (
                f"{change.ref} of {change.project} is a branch head, not a change: "
                f"{self.pipeline.name} gates changes before they merge."
            )
        return super().why_not_enqueue(change)

    def get_change_queue(self, change: Change) -> ChangeQueue:
        name = change.project
        return self.pipeline.get_queue(name) or self._new_queues.get(name) or self.new_queue(name)

    def changes_to_enqueue(self, change: Change) -> list[tuple[Change, bool]]:
        """The changes it needs enter the gate ahead of it if they are
        approved; otherwise it waits, and enters behind them when they do."""
        queued = {i.change.number for i in self.known_items()}
        out = []
        for dep in self.dependencies(change):
            if dep.number in queued:
                continue
            if not dep.approved:
                raise EnqueueRefused(
                    f"Change {change.number} waits for change {dep.number}, which it depends "
                    "on and which is not approved yet."
                )
            out.append((dep, True))
        return [*out, (change, True)]

    def on_enqueued(self, item: QueueItem) -> None:
        # A new patchset of a gated change was not approved: Zuul drops the
        # old one from the gate (dequeue-on-new-patchset).
        for old in self.find_items(item.change.number):
            if old.change.patchset < item.change.patchset:
                self.dequeue(old, f"superseded by patchset {item.change.patchset}")
        self.enqueue_changes_behind(item)

    def enqueue_changes_behind(self, item: QueueItem) -> None:
        """Approved changes that waited for this one enter behind it."""
        conn = self.sched.connections[item.change.connection]
        for change in conn.changes_depending_on(item.change):
            if not change.approved or self.why_not_enqueue(change):
                continue
            txn = self.state.transaction()
            try:
                items = self.plan(change, item.event_id, txn)
            except EnqueueRefused as refused:
                self.log.info("Not enqueued behind %s: %s", item.label, refused, item=item)
                continue
            txn.commit()
            self.enqueue(items)

    def promote(self, item: QueueItem) -> None:
        """Move the item to the head of its queue; everything behind restarts."""
        queue = self.pipeline.get_queue(item.queue)
        if any(i.uuid in self._landing for i in queue.items):
            self.log.warning(
                "Not promoted: the head of queue %s is being merged", queue.name, item=item
            )
            return
        order = [item, *(i for i in queue.items if i is not item)]
        for other in queue.items:
            other.item_ahead, other.items_behind = None, []
        queue.items = []
        for other in order:
            queue.enqueue(other)
        self.save_queue(queue)
        for other in order:
            self.reset_item(other)
