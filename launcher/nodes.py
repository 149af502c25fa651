"""The requestor's side of a node request, through the nodepool ZooKeeper facade.

Nodepool v3's handshake (doc/architecture.md): create an ephemeral request,
wait for its DataWatch to report `fulfilled` or `failed`, lock the node and
mark it `in-use`, delete the request; after the build mark it `used` and
unlock, and nodepool destroys it. Waiting is one condition woken by the
watch, by cancel() or by a ZooKeeper state change, never a polling loop.

The request is ephemeral, so an expired ZooKeeper session deletes it: that is
not nodepool's answer, so once a new session is up the requester asks again
(within the same overall timeout) instead of failing the build.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from launcher.buildlog import Log
from nodepool_lite import exceptions as npexc
from nodepool_lite.model import Node, NodeRequest, NodeState, RequestState
from nodepool_lite.zk import NODE_ROOT, ZooKeeper

log = logging.getLogger("launcher.nodes")

NODE_LOCK_TIMEOUT = 30.0


class NodeError(Exception):
    """No usable node: the message is the one sentence the vote shows."""


class NodeRequestCancelled(Exception):
    """The build was cancelled while it waited for a node."""


class NodeRequester:
    """Gets one node of a label for one build, and gives it back afterwards."""

    def __init__(self, zk: ZooKeeper, requestor: str, build_log: Log = log) -> None:
        self.zk = zk
        self.requestor = requestor
        self.log = build_log
        self._cond = threading.Condition()
        self._cancelled = False
        self._sessions_lost = 0

    def cancel(self) -> None:
        """Wake a waiting request() so it gives up; safe from any thread."""
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()

    def on_connection(self, state: str) -> None:
        """A ZooKeeper state change ("CONNECTED", "SUSPENDED", "LOST"); never blocks."""
        with self._cond:
            if state == "LOST":
                self._sessions_lost += 1
            self._cond.notify_all()

    def request(self, node_type: str, timeout: float) -> Node:
        """Block until nodepool fulfils a request for `node_type`; return the node in use.

        Raises NodeError when the request fails, times out or the node vanished,
        NodeRequestCancelled when cancel() was called.
        """
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda: self._cancelled or self.zk.connected, deadline - time.monotonic()
                )
            if self._cancelled:
                raise NodeRequestCancelled()
            if not self.zk.connected:
                raise NodeError(f"No {node_type} node was provided within {timeout:.0f} seconds.")
            node = self._request_once(node_type, deadline, timeout)
            if node is not None:
                return node

    def _request_once(self, node_type: str, deadline: float, timeout: float) -> Node | None:
        """One request; None when the ZooKeeper session (and so the request) was lost."""
        outcome: dict[str, NodeRequest | None] = {}

        def watcher(req: NodeRequest | None) -> bool | None:
            if req is None or req.state in (RequestState.FULFILLED, RequestState.FAILED):
                with self._cond:
                    outcome["request"] = req
                    self._cond.notify_all()
                return False
            return None

        with self._cond:
            session = self._sessions_lost
        req = NodeRequest(node_types=[node_type], requestor=self.requestor)
        try:
            self.zk.submit_node_request(req, watcher)
        except npexc.ZKError as error:
            if self.zk.connected:
                raise NodeError(
                    f"Could not ask nodepool for a {node_type} node: {error}"
                ) from None
            self.log.warning("ZooKeeper went away while asking for a node; asking again once back")
            return None
        self.log.info("Node request %s for %s submitted", req.id, node_type)
        try:
            with self._cond:
                self._cond.wait_for(
                    lambda: (
                        self._cancelled or "request" in outcome or self._sessions_lost != session
                    ),
                    deadline - time.monotonic(),
                )
                lost = self._sessions_lost != session
            if self._cancelled:
                raise NodeRequestCancelled()
            done = outcome.get("request")
            if done is None and lost:
                self.log.warning(
                    "The ZooKeeper session expired while node request %s waited; "
                    "asking again once it is back",
                    req.id,
                )
                return None
            if "request" not in outcome:
                raise NodeError(f"No {node_type} node was provided within {timeout:.0f} seconds.")
            if done is None:
                raise NodeError(f"Node request {req.id} for {node_type} vanished.")
            if done.state == RequestState.FAILED:
                reason = (done.reason or "no provider could serve it").rstrip(".")
                raise NodeError(f"Node request for {node_type} failed: {reason}.")
            return self._accept(done, node_type)
        finally:
            self._discard(req)

    def _discard(self, req: NodeRequest) -> None:
        """Delete the request; with the session down it is gone already."""
        try:
            self.zk.delete_node_request(req)
        except npexc.NodepoolError as error:
            self.log.debug("Could not delete node request %s: %s", req.id, error)

    def _accept(self, req: NodeRequest, node_type: str) -> Node:
        if not req.nodes:
            raise NodeError(f"Node request {req.id} for {node_type} was fulfilled with no node.")
        node = self.zk.get_node(req.nodes[0])
        if node is None:
            raise NodeError(f"Node {req.nodes[0]} for {node_type} was deleted before use.")
        try:
            self.zk.lock_node(node, blocking=True, timeout=NODE_LOCK_TIMEOUT)
        except (npexc.LockError, npexc.NoNodeError) as error:
            raise NodeError(
                f"Node {node.id} for {node_type} could not be locked: {error}"
            ) from error
        try:
            node.state = NodeState.IN_USE
            self.zk.store_node(node)
        except npexc.NodepoolError as error:
            self.zk.unlock_node(node)
            raise NodeError(f"Node {node.id} for {node_type} is not usable: {error}") from error
        self.log.info("Node %s (%s:%s) in use", node.id, node.interface_ip, node.connection_port)
        return node

    def watch_lost(self, node: Node, on_lost: Callable[[str], None]) -> Callable[[], None]:
        """Call `on_lost(reason)` once if nodepool deletes or fails the node mid-build.

        Returns a function that stops watching (call it before releasing the node).
        """
        stopped = threading.Event()
        path = f"{NODE_ROOT}/{node.id}"

        def on_data(data: dict | None, version: int | None) -> bool | None:
            if stopped.is_set():
                return False
            if data is None:
                on_lost(f"Node {node.id} was deleted while the build ran.")
                return False
            if data.get("state") in (NodeState.DELETING.value, NodeState.FAILED.value):
                on_lost(f"Node {node.id} went {data['state']} while the build ran.")
                return False
            return None

        self.zk.watch_data(path, on_data)
        return stopped.set

    def release(self, node: Node) -> None:
        """Mark the node `used` and unlock it, so nodepool destroys it."""
        self._give_back(node, NodeState.USED)

    def hold(self, node: Node, hold_job: str, comment: str) -> None:
        """Mark the node `hold` (autohold) and unlock it: nodepool keeps it
        until an operator deletes it."""
        node.hold_job, node.comment = hold_job, comment
        self._give_back(node, NodeState.HOLD)

    def _give_back(self, node: Node, state: NodeState) -> None:
        """A node nodepool already took back (deleted, `deleting`, `failed`) is
        only unlocked: writing over it would undo nodepool's decision."""
        try:
            fresh = self.zk.get_node(node.id or "")
            if fresh is None or fresh.state != NodeState.IN_USE:
                self.log.info(
                    "Node %s is already %s", node.id, fresh.state.value if fresh else "gone"
                )
                return
            node.state = state
            self.zk.store_node(node)
            self.log.info("Node %s released (%s)", node.id, state.value)
        except npexc.NodepoolError:
            self.log.exception("Could not mark node %s %s", node.id, state.value)
        finally:
            try:
                self.zk.unlock_node(node)
            except npexc.NodepoolError:
                self.log.exception("Could not unlock node %s", node.id)
