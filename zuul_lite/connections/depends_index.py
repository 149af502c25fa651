"""Which changes name which in their Depends-On footers, kept in ZooKeeper.

The gate enqueues an approved change behind the one it waited for as soon as
that one enters (Zuul's needed-by); finding the waiting changes must not mean
reading every open change from the review system, so each connection that
parses footers itself (the local inbox, Patchwork) keeps this index: one
znode mapping change number -> its latest Depends-On values.
"""

from __future__ import annotations

from collections.abc import Callable

from nodepool_lite.exceptions import BadVersionError, NodeExistsError, NoNodeError
from nodepool_lite.zk import ZooKeeper


class DependsOnIndex:
    def __init__(self, zk: ZooKeeper, path: str) -> None:
        self.zk = zk
        self.path = path

    def set(self, number: int, refs: list[str]) -> None:
        """Record the footers of `number`'s latest patchset (none: forget it)."""
        while True:
            try:
                index, version = self.zk.get(self.path)
            except NoNodeError:
                if not refs:
                    return
                try:
                    self.zk.create(self.path, {str(number): refs})
                    return
                except NodeExistsError:
                    continue
            if index.get(str(number)) == (refs or None):
                return
            if refs:
                index[str(number)] = refs
            else:
                del index[str(number)]
            try:
                self.zk.set(self.path, index, version=version)
                return
            except BadVersionError:
                continue

    def naming(self, number: int, parse: Callable[[str], int | None]) -> list[int]:
        """The changes with a footer that `parse` reads as `number`, in order."""
        index = self.zk.get_or_none(self.path) or {}
        return sorted(
            int(other) for other, refs in index.items() if any(parse(r) == number for r in refs)
        )
