"""Destroying nodes: used ones, failed ones, and whatever a crash left behind.

Nodes are used exactly once, so this worker is what keeps capacity free. It
decides from ZooKeeper alone plus the driver's view of what still runs, which
is why the same code serves normal operation and reconciliation after a
restart:

- `used`, `deleting`, `failed` nodes are destroyed;
- `building` nodes whose launcher is no longer registered, or is ours but
  not launching them any more (it failed half-way), were abandoned;
- `ready` nodes whose request is gone (the requestor died) or was never
  fulfilled by a live launcher are destroyed (unallocated ones are
  min-ready's spares and stay);
- `in-use` nodes whose lock is free lost their requestor (it holds the lock
  for as long as it uses the node);
- node directories and containers with no ZooKeeper record are leaked.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from nodepool_lite import exceptions as exc
from nodepool_lite.model import Node, NodeState, RequestState
from nodepool_lite.worker import BaseWorker
from nodepool_lite.zk import NODE_ROOT, REQUEST_LOCK_ROOT

if TYPE_CHECKING:
    from nodepool_lite.drivers.base import Provider
    from nodepool_lite.launcher import NodePool

log = logging.getLogger("nodepool_lite.launcher.CleanupWorker")


class CleanupWorker(BaseWorker):
    """Also called DeletedNodeWorker in Nodepool; one per NodePool. Watches
    wake it on every node and request change, and on the release of the lock
    of a node it would destroy but could not lock (a requestor marks its node
    used before it unlocks it; one that dies while a node is in-use only
    drops its lock)."""

    def __init__(self, nodepool: NodePool):
        super().__init__("CleanupWorker", nodepool.stop_event, log)
        self.nodepool = nodepool
        self.zk = nodepool.zk
        self.deleting: set[str] = set()
        self._deleters: list[threading.Thread] = []
        self._deleters_lock = threading.Lock()
        self._lock_watches: set[str] = set()

    def reconcile(self) -> None:
        """On start: nodes that should be running but are not become `failed`;
        the ones still running are adopted as they are."""
        for node in self.zk.nodes():
            provider = self.nodepool.providers.get(node.provider)
            if provider is None or node.state not in (
                NodeState.READY, NodeState.IN_USE, NodeState.HOLD,
            ):  # fmt: skip
                continue
            try:
                alive = provider.adopt(node)
            except exc.NodepoolError as error:
                log.warning("Node %s left as it is: %s", node.id, error)
                continue  # its provider cannot tell now; the next start asks again
            if alive:
                log.info("Adopted node %s (%s, %s)", node.id, node.type, node.state)
                continue
            try:
                self.zk.lock_node(node, blocking=False)
            except (exc.LockError, exc.NoNodeError):
                continue
            try:
                log.warning("Node %s (%s) is not running; marking it failed", node.id, node.state)
                node.state = NodeState.FAILED
                self.zk.store_node(node)
            finally:
                self.zk.unlock_node(node)
        self.cleanup()

    def run_once(self) -> None:
        self.cleanup()

    def stopped(self) -> None:
        for thread in list(self._deleters):
            thread.join()

    def _should_destroy(self, node: Node, launchers: set[str], requests: dict) -> bool:
        if node.state in (NodeState.USED, NodeState.DELETING, NodeState.FAILED):
            return True
        if node.state == NodeState.BUILDING:
            # Abandoned: its launcher is gone, or is ours but no longer on it.
            if node.launcher in self.nodepool.launcher_ids():
                return not self.nodepool.is_launching(node.id or "")
            return node.launcher not in launchers
        if node.state == NodeState.READY:
            if node.allocated_to is None:
                return False  # a spare kept by min-ready
            req = requests.get(node.allocated_to)
            if req is None:
                return True
            return req.state != RequestState.FULFILLED and node.launcher not in launchers
        # in-use: the lock test in _destroy decides.
        return node.state == NodeState.IN_USE

    def cleanup(self) -> None:
        launchers = set(self.zk.get_launchers())
        requests = {}
        for request_id in self.zk.node_request_ids():
            req = self.zk.get_node_request(request_id)
            if req is not None:
                requests[request_id] = req
        known = set()
        for node in self.zk.nodes():
            known.add(node.id)
            if node.provider not in self.nodepool.providers or node.id in self.deleting:
                continue
            if self._should_destroy(node, launchers, requests):
                self._destroy(node, launchers, requests)
        with self._deleters_lock:
            self._lock_watches &= known  # a node deleted while locked ends its watch silently
        for name, provider in self.nodepool.providers.items():
            try:
                self._destroy_leaked(name, provider, known)
            except exc.NodepoolError as error:
                # One provider that cannot answer (a cloud down) holds up no other.
                log.warning("Leak cleanup of provider %s failed: %s", name, error)
        for request_id in self.zk.request_lock_ids():
            if request_id not in requests and not self.zk.get_children(
                f"{REQUEST_LOCK_ROOT}/{request_id}"
            ):
                self.zk.delete_request_lock(request_id)

    def _destroy_leaked(self, name: str, provider: Provider, known: set) -> None:
        for node_id in provider.leaked_node_ids():
            if node_id in known or node_id in self.deleting:
                continue
            if self.zk.get_node(node_id) is None:
                log.warning("Destroying leaked node %s of provider %s", node_id, name)
                provider.cleanup_node(node_id)

    def _destroy(self, node: Node, launchers: set[str], requests: dict) -> None:
        try:
            self.zk.lock_node(node, blocking=False)
        except exc.LockError:
            self._wake_when_unlocked(node)  # its requestor or launcher holds it
            return
        except exc.NoNodeError:
            return
        if node.state != NodeState.DELETING and not self._should_destroy(
            node, launchers, requests
        ):
            self.zk.unlock_node(node)
            return
        previous = node.state
        node.state = NodeState.DELETING
        self.zk.store_node(node)
        log.info("Deleting node %s (%s, was %s)", node.id, node.type, previous.value)
        with self._deleters_lock:
            self.deleting.add(node.id or "")
            self._deleters = [t for t in self._deleters if t.is_alive()]
            thread = threading.Thread(
                target=self._delete_node, args=(node,), name=f"NodeDeleter-{node.id}", daemon=True
            )
            self._deleters.append(thread)
        thread.start()

    def _wake_when_unlocked(self, node: Node) -> None:
        node_id = node.id or ""
        with self._deleters_lock:
            if node_id in self._lock_watches:
                return
            self._lock_watches.add(node_id)

        def on_holders(holders: list[str]) -> bool | None:
            if holders and not self.stop_event.is_set():
                return None
            with self._deleters_lock:
                self._lock_watches.discard(node_id)
            self.wake_event.set()
            return False

        try:
            # No ensure: a lock dir that went with its node needs no watch.
            self.zk.watch_children(f"{NODE_ROOT}/{node_id}/lock", on_holders, ensure=False)
        except exc.ZKError:
            with self._deleters_lock:
                self._lock_watches.discard(node_id)

    def _delete_node(self, node: Node) -> None:
        provider = self.nodepool.providers[node.provider]
        deleted = False
        try:
            provider.cleanup_node(node.id or "")
            self.zk.delete_node(node)
            deleted = True
        except exc.NodepoolError as error:
            log.warning("Could not delete node %s, will retry: %s", node.id, error)
        except Exception:
            log.exception("Could not delete node %s; will retry", node.id)
        finally:
            try:
                self.zk.unlock_node(node)
            except exc.ZKError:
                pass
            with self._deleters_lock:
                self.deleting.discard(node.id or "")
        if deleted:
            self.wake_event.set()
        # else: retried on the next change or tick, not in a loop against a
        # provider that is down.
