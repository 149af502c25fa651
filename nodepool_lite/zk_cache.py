"""Node requests and nodes as the launcher last saw them, kept by ZooKeeper watches.

A pool worker's pass reads every request and its pool's nodes; read from
ZooKeeper that is four round trips on the path of every node handout, before
any lock is tried. Here they come from two kazoo TreeCaches (zk.CachedTree)
instead. The cache only tells a worker what to try: every request and node is
locked and read afresh before it is changed (zk_nodepool's lock_* methods),
and a decision that must not run ahead of ZooKeeper (room for one more node
in a pool) reads ZooKeeper itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from nodepool_lite.model import Node, NodeRequest
from nodepool_lite.zk import NODE_ROOT, REQUEST_ROOT, CachedTree, ZooKeeper

T = TypeVar("T", Node, NodeRequest)


class StateCache:
    """`on_new_request()` when a request appears (it concerns the pool workers
    alone), `on_change()` on any other change of a request or a node, or when
    the caches reconnected."""

    def __init__(
        self, zk: ZooKeeper, on_new_request: Callable[[], None], on_change: Callable[[], None]
    ):
        self._on_new_request = on_new_request
        self._on_change = on_change
        self._requests = zk.cached_tree(REQUEST_ROOT, self._request_changed)
        self._nodes = zk.cached_tree(NODE_ROOT, self._node_changed)

    def start(self) -> None:
        self._requests.start()
        self._nodes.start()

    def close(self) -> None:
        self._requests.close()
        self._nodes.close()

    def requests(self) -> list[NodeRequest]:
        """In the order they are served (`<priority>-<sequence>`)."""
        return _objects(self._requests, NodeRequest)

    def nodes(self) -> list[Node]:
        return _objects(self._nodes, Node)

    def _request_changed(self, kind: str, child: str) -> None:
        if kind == "added":
            self._on_new_request()
        else:
            self._on_change()

    def _node_changed(self, kind: str, child: str) -> None:
        self._on_change()


def _objects(tree: CachedTree, cls: type[T]) -> list[T]:
    """The children of `tree` as `cls` objects, by id; a znode without data
    (a lock dir left behind by a deleted node) is none."""
    found = []
    for child in tree.children():
        data = tree.data(child)
        if data:
            found.append(cls.from_dict(data, id=child))
    return found
