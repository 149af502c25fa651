"""`min-ready`: keep ready nodes of a label booted, so a job gets one at once.

As in Nodepool, the launcher asks for them itself: it submits ordinary node
requests as requestor `NodePool:min-ready`, at a lower priority than jobs'
requests, so allocation, quota, failover and retries stay in the pool
workers alone. When such a request is fulfilled, its nodes are made
unallocated (`allocated_to` None) and the request is deleted
(`release_nodes`); a pool worker hands such a spare to the next request for
its label at once, and this worker asks for a replacement.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from nodepool_lite.model import Node, NodeRequest, NodeState, RequestState
from nodepool_lite.worker import BaseWorker

if TYPE_CHECKING:
    from nodepool_lite.launcher import NodePool
    from nodepool_lite.zk import ZooKeeper

log = logging.getLogger("nodepool_lite.launcher.MinReadyWorker")

REQUESTOR = "NodePool:min-ready"
PRIORITY = "200"  # after jobs' requests (zk_nodepool.DEFAULT_PRIORITY is 100)
# A failed min-ready request is kept this long before it is asked again, so a
# label whose launches fail does not turn into a loop of boots.
FAILED_BACKOFF = 60.0


def is_min_ready(req: NodeRequest) -> bool:
    return req.requestor == REQUESTOR


def is_spare(node: Node) -> bool:
    """A ready node no request owns: what min-ready keeps booted."""
    return node.state == NodeState.READY and node.allocated_to is None


def release_nodes(zk: ZooKeeper, req: NodeRequest, nodes: list[Node]) -> None:
    """A fulfilled min-ready request: its (locked) nodes become spares, then
    the request goes, before its lock: a pool worker that saw it `pending`
    must never find it unlocked, take it for one whose launcher died and
    hand it back."""
    for node in nodes:
        node.allocated_to = None
        zk.store_node(node)
    zk.delete_node_request(req)
    zk.unlock_node_request(req)


class MinReadyWorker(BaseWorker):
    """Submits min-ready requests until each label has its spares."""

    def __init__(self, nodepool: NodePool):
        super().__init__("MinReadyWorker", nodepool.stop_event, log)
        self.nodepool = nodepool
        self.zk = nodepool.zk

    def run_once(self) -> None:
        wanted = self.nodepool.config.min_ready
        if not wanted:
            return
        have = {label: 0 for label in wanted}
        now = time.time()
        for req in self.zk.node_requests():
            if not is_min_ready(req):
                continue
            if req.state == RequestState.FAILED and now - req.state_time > FAILED_BACKOFF:
                self.zk.delete_node_request(req)
                continue
            # Requested, pending, failed lately, or fulfilled and being released.
            for label in req.node_types:
                if label in have:
                    have[label] += 1
        # Nodes after requests: a request released meanwhile shows its node
        # as a spare here, counted twice (asked for on the next pass) rather
        # than not at all (asked for twice).
        for node in self.zk.nodes():
            if node.type in have and is_spare(node):
                have[node.type] += 1
        for label, count in wanted.items():
            for _ in range(count - have[label]):
                req = NodeRequest(node_types=[label], requestor=REQUESTOR)
                self.zk.submit_node_request(req, priority=PRIORITY)
                log.info("Requested a ready node of %s (min-ready %d): %s", label, count, req.id)
