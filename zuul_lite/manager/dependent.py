"""The dependent manager (gate): one shared queue per project, each item
tested on top of every item ahead, merged in order."""

from __future__ import annotations

from zuul_lite.manager import PipelineManager
from zuul_lite.model import Change, ChangeQueue, QueueItem


class DependentPipelineManager(PipelineManager):
    changes_merge = True

    def get_change_queue(self, change: Change) -> ChangeQueue:
        name = change.project
        return self.pipeline.get_queue(name) or self.new_queue(name)

    def on_enqueued(self, item: QueueItem) -> None:
        # A new patchset of a gated change was not approved: Zuul drops the
        # old one from the gate (dequeue-on-new-patchset).
        for old in self.find_items(item.change.number):
            if old.change.patchset < item.change.patchset:
                self.dequeue(old, f"superseded by patchset {item.change.patchset}")

    def promote(self, item: QueueItem) -> None:
        """Move the item to the head of its queue; everything behind restarts."""
        queue = self.pipeline.get_queue(item.queue)
        order = [item, *(i for i in queue.items if i is not item)]
        for other in queue.items:
            other.item_ahead, other.items_behind = None, []
        queue.items = []
        for other in order:
            queue.enqueue(other)
        self.save_queue(queue)
        for other in order:
            self.reset_item(other)
