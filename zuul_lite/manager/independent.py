"""The independent manager (check): every item is tested on its own."""

from __future__ import annotations

from zuul_lite.manager import PipelineManager
from zuul_lite.model import Change, ChangeQueue, QueueItem


class IndependentPipelineManager(PipelineManager):
    """Each item gets a queue of its own on the branch head; a new patchset of
    a change replaces the older one, which is dequeued without a report. A
    branch head (a ref item, in post) is an item of its own too."""

    def get_change_queue(self, change: Change) -> ChangeQueue:
        if change.is_ref:  # one item per project and commit (why_not_enqueue)
            return self.new_queue(f"{change.project}-{change.newrev}", dynamic=True)
        return self.new_queue(f"{change.project}-{change.number}-{change.patchset}", dynamic=True)

    def changes_to_enqueue(self, change: Change) -> list[tuple[Change, bool]]:
        """Tested on top of the changes it needs, which are not reported."""
        return [*((dep, False) for dep in self.dependencies(change)), (change, True)]

    def on_enqueued(self, item: QueueItem) -> None:
        for old in self.find_items(item.change.number):
            if old.live and old.change.patchset < item.change.patchset:
                self.dequeue(old, f"superseded by patchset {item.change.patchset}")
