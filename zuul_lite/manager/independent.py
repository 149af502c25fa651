"""The independent manager (check): every item is tested on its own."""

from __future__ import annotations

from zuul_lite.manager import PipelineManager
from zuul_lite.model import QueueItem


class IndependentPipelineManager(PipelineManager):
    """Each item stands alone on the branch head; a new patchset of a change
    replaces the older one, which is dequeued without a vote."""

    def add_item(self, item: QueueItem) -> None:
        for old in self.superseded_by(item):
            self.dequeue(old, f"superseded by patchset {item.patchset}")
        super().add_item(item)
