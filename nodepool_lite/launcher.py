"""The nodepool launcher daemon: turns node requests into nodes, and used nodes
into nothing.

Threads (each waits on its own wake event, set by ZooKeeper watches, so there
is no polling; a long safety tick only covers watches lost with a session):

- one PoolWorker per provider pool: serves, declines or queues requests;
- one NodeLauncher per accepted request: boots its nodes, fulfils it;
- the CleanupWorker (cleanup.py): destroys used, failed and orphaned nodes.

Every pool worker registers as a launcher in ZooKeeper (ephemeral), so a
request that every live pool declined can be failed with a reason, and nodes
whose launcher vanished (crash, restart) can be told apart from nodes being
built right now.
"""

from __future__ import annotations

import logging
import socket
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry

from nodepool_lite import config as npconfig
from nodepool_lite import exceptions as exc
from nodepool_lite.cleanup import CleanupWorker
from nodepool_lite.drivers import registry
from nodepool_lite.drivers.base import PoolConfig, Provider
from nodepool_lite.metrics import MetricsServer, StateCollector
from nodepool_lite.model import Node, NodeRequest, NodeState, RequestState
from nodepool_lite.worker import BaseWorker
from nodepool_lite.zk import IMAGE_ROOT, LAUNCHER_ROOT, NODE_ROOT, REQUEST_ROOT, ZooKeeper

log = logging.getLogger("nodepool_lite.launcher")


class TreeWatcher:
    """Calls `notify()` when a child of `root` appears or goes, or (with
    `data=True`) when a child's data changes."""

    def __init__(self, zk: ZooKeeper, root: str, notify: Callable[[], None], data: bool = True):
        self.zk = zk
        self.root = root
        self.notify = notify
        self.data = data
        self.stopped = False
        self._watched: set[str] = set()
        self._watched_lock = threading.Lock()

    def start(self) -> None:
        self.zk.watch_children(self.root, self._on_children)

    def _on_children(self, children: list[str]) -> bool | None:
        if self.stopped:
            return False
        if self.data:
            with self._watched_lock:
                new = set(children) - self._watched
                self._watched |= new
            for child in sorted(new):
                threading.Thread(target=self._watch_child, args=(child,), daemon=True).start()
        self.notify()
        return None

    def _watch_child(self, child: str) -> None:
        # Registered from a helper thread: a DataWatch does a synchronous read,
        # which must not run on kazoo's callback thread.
        def on_data(data: dict | None, version: int | None) -> bool | None:
            if self.stopped:
                return False
            self.notify()
            if data is None:
                with self._watched_lock:
                    self._watched.discard(child)
                return False
            return None

        try:
            self.zk.watch_data(f"{self.root}/{child}", on_data)
        except exc.ZKError:
            log.warning("Could not watch %s/%s", self.root, child)


class NodeLauncher(threading.Thread):
    """Boots the nodes of one accepted request (holding its lock and theirs)."""

    def __init__(self, worker: PoolWorker, req: NodeRequest, nodes: list[Node]):
        super().__init__(name=f"NodeLauncher-{req.id}", daemon=True)
        self.worker = worker
        self.zk = worker.zk
        self.req = req
        self.nodes = nodes
        self.log = logging.getLogger(f"nodepool_lite.launcher.NodeLauncher.{req.id}")

    def run(self) -> None:
        try:
            self._run()
        except Exception:
            self.log.exception("Launching nodes for request %s failed", self.req.id)
        finally:
            for node in self.nodes:
                self._unlock(node)
            self.worker.nodepool.launch_finished(self.nodes)
            if self.req.lock is not None:
                try:
                    self.zk.unlock_node_request(self.req)
                except exc.ZKError:
                    self.log.warning("Could not unlock request %s", self.req.id)
            self.worker.launch_done(self)

    def _unlock(self, node: Node) -> None:
        try:
            self.zk.unlock_node(node)
        except exc.ZKError:
            self.log.warning("Could not unlock node %s", node.id)

    def _launch(self, node: Node) -> str | None:
        """Boot one node; returns an error message or None."""
        error = "unknown error"
        attempts = self.worker.handler.launch_attempts
        for attempt in range(1, attempts + 1):
            try:
                self.worker.handler.launch(node)
            except Exception as e:  # a driver failure of any kind fails this attempt
                error = str(e)
                self.log.warning(
                    "Launch of node %s failed (attempt %d/%d): %s",
                    node.id, attempt, attempts, error,
                )  # fmt: skip
                if self.worker.stop_event.is_set():
                    break
                continue
            node.state = NodeState.READY
            self.zk.store_node(node)
            return None
        node.state = NodeState.FAILED
        self.zk.store_node(node)
        return error

    def _run(self) -> None:
        errors = []
        for node in self.nodes:
            error = self._launch(node)
            if error:
                errors.append(f"node {node.id} ({node.type}): {error}")
                break
        if self.zk.get_node_request(self.req.id or "") is None:
            self.log.info(
                "Request %s vanished (requestor gone); discarding its nodes", self.req.id
            )
            self._discard_ready()
            return
        if errors:
            self._discard_ready()
            self.req.state = RequestState.FAILED
            self.req.reason = "; ".join(errors)
        else:
            self.req.nodes = [n.id for n in self.nodes if n.id]
            self.req.state = RequestState.FULFILLED
        for node in self.nodes:
            self._unlock(node)
        try:
            self.zk.store_node_request(self.req)
        except exc.NoNodeError:
            self.log.info("Request %s vanished before it was fulfilled", self.req.id)
            return
        if errors:
            self.log.warning("Request %s failed: %s", self.req.id, self.req.reason)
        else:
            self.log.info("Request %s fulfilled: nodes %s", self.req.id, self.req.nodes)

    def _discard_ready(self) -> None:
        for node in self.nodes:
            if node.state in (NodeState.READY, NodeState.BUILDING):
                node.state = NodeState.DELETING
                self.zk.store_node(node)


class PoolWorker(BaseWorker):
    """Serves the requests one provider pool can serve, in order of priority."""

    def __init__(self, nodepool: NodePool, provider: Provider, pool: PoolConfig):
        name = f"{provider.provider.name}-{pool.name}"
        super().__init__(
            f"PoolWorker-{name}",
            nodepool.stop_event,
            logging.getLogger(f"nodepool_lite.launcher.PoolWorker.{name}"),
        )
        self.nodepool = nodepool
        self.zk = nodepool.zk
        self.provider = provider
        self.pool = pool
        self.handler = provider.request_handler(pool)
        self.launcher_id = f"{socket.gethostname()}-{name}-{uuid.uuid4().hex[:8]}"
        self.launchers: set[NodeLauncher] = set()
        self._launchers_lock = threading.Lock()

    def register(self) -> None:
        self.zk.register_launcher(self.launcher_id, sorted(self.pool.labels))

    def run_once(self) -> None:
        self._process_requests()

    def stopped(self) -> None:
        for launcher in list(self.launchers):
            launcher.join()

    def launch_done(self, launcher: NodeLauncher) -> None:
        with self._launchers_lock:
            self.launchers.discard(launcher)
        self.nodepool.wake()

    def _used_servers(self) -> int:
        name = self.provider.provider.name
        return sum(1 for n in self.zk.nodes() if n.provider == name and n.pool == self.pool.name)

    def _process_requests(self) -> None:
        launchers = self.zk.get_launchers()
        for request_id in self.zk.node_request_ids():
            if self.stop_event.is_set():
                return
            req = self.zk.get_node_request(request_id)
            if req is None:
                continue
            if req.state == RequestState.PENDING:
                self._recover_lost(req)
                continue
            if req.state != RequestState.REQUESTED:
                continue
            if self.launcher_id in req.declined_by:
                if set(launchers) <= set(req.declined_by):
                    self._decline(req, launchers)  # a launcher that could serve it left
                continue
            if not self.handler.serves(req.node_types):
                self._decline(req, launchers)
                continue
            if not self.handler.ready(req.node_types):
                self.log.debug("Request %s waits for an image of %s", req.id, req.node_types)
                continue
            if not self.handler.has_capacity(req.node_types, self._used_servers()):
                # First come, first served: later requests wait too.
                self.log.debug("Request %s waits for capacity", req.id)
                return
            self._accept(req)

    def _try_lock(self, req: NodeRequest) -> bool:
        try:
            self.zk.lock_node_request(req, blocking=False)
        except (exc.LockError, exc.NoNodeError):
            return False
        return True

    def _recover_lost(self, req: NodeRequest) -> None:
        """A pending request whose lock is free lost its launcher: hand it back."""
        if not self._try_lock(req):
            return
        try:
            if req.state == RequestState.PENDING:
                self.log.info("Request %s lost its launcher; requeueing it", req.id)
                req.state = RequestState.REQUESTED
                self.zk.store_node_request(req)
        finally:
            self.zk.unlock_node_request(req)

    def _decline(self, req: NodeRequest, launchers: dict[str, list[str]]) -> None:
        if not self._try_lock(req):
            return
        try:
            if req.state != RequestState.REQUESTED:
                return
            if self.launcher_id not in req.declined_by:
                req.declined_by.append(self.launcher_id)
            if set(launchers) | {self.launcher_id} <= set(req.declined_by):
                req.state = RequestState.FAILED
                req.reason = _decline_reason(req, launchers)
                self.log.info("Request %s failed: %s", req.id, req.reason)
            else:
                self.log.debug("Declined request %s", req.id)
            self.zk.store_node_request(req)
        finally:
            self.zk.unlock_node_request(req)

    def _accept(self, req: NodeRequest) -> None:
        if not self._try_lock(req):
            return
        if req.state != RequestState.REQUESTED or self.launcher_id in req.declined_by:
            self.zk.unlock_node_request(req)
            return
        nodes: list[Node] = []
        try:
            req.state = RequestState.PENDING
            self.zk.store_node_request(req)
            for label in req.node_types:
                node = Node(
                    type=label,
                    provider=self.provider.provider.name,
                    pool=self.pool.name,
                    launcher=self.launcher_id,
                    allocated_to=req.id,
                )
                self.nodepool.launch_started(node)
                nodes.append(node)
                self.zk.lock_node(node)
        except exc.ZKError:
            # Unlocked `building` nodes of no running launch are cleaned up,
            # and the unlocked `pending` request is requeued.
            for node in nodes:
                self.zk.unlock_node(node)
            self.nodepool.launch_finished(nodes)
            self.zk.unlock_node_request(req)
            raise
        self.log.info("Request %s accepted: launching nodes %s", req.id, [n.id for n in nodes])
        launcher = NodeLauncher(self, req, nodes)
        with self._launchers_lock:
            self.launchers.add(launcher)
        launcher.start()


def _decline_reason(req: NodeRequest, launchers: dict[str, list[str]]) -> str:
    offered = {label for labels in launchers.values() for label in labels}
    missing = [label for label in req.node_types if label not in offered]
    if missing:
        return f"no provider offers label {missing[0]}"
    return f"no provider pool can serve node types {', '.join(req.node_types)} together"


class NodePool:
    """The daemon: `start()`, `stop()`, `join()`; owns its ZooKeeper session."""

    def __init__(self, config_path: str | Path, zk_hosts: str | None = None):
        self.config = npconfig.load(config_path)
        self.zk = ZooKeeper(zk_hosts or self.config.zookeeper_hosts, tls=self.config.zookeeper_tls)
        self.stop_event = threading.Event()
        self.providers: dict[str, Provider] = {}
        self.pool_workers: list[PoolWorker] = []
        self.cleanup_worker: CleanupWorker | None = None
        self.watchers: list[TreeWatcher] = []
        self._unwatch: list[Callable[[], None]] = []
        self._launching: set[str] = set()
        self._launching_lock = threading.Lock()
        self.metrics: MetricsServer | None = None
        if self.config.metrics_launcher_port is not None:
            registry = CollectorRegistry()
            registry.register(StateCollector(self.zk))
            self.metrics = MetricsServer(
                registry, self.config.metrics_listen, self.config.metrics_launcher_port
            )

    def launch_started(self, node: Node) -> None:
        """Store a new `building` node and mark it as being launched here, in
        one step as seen by the cleanup worker (see `is_launching`)."""
        with self._launching_lock:
            self.zk.store_node(node)
            self._launching.add(node.id or "")

    def launch_finished(self, nodes: list[Node]) -> None:
        with self._launching_lock:
            self._launching -= {n.id for n in nodes if n.id}

    def launcher_ids(self) -> set[str]:
        return {w.launcher_id for w in self.pool_workers}

    def is_launching(self, node_id: str) -> bool:
        with self._launching_lock:
            return node_id in self._launching

    def wake(self) -> None:
        for worker in self.pool_workers:
            worker.wake_event.set()
        if self.cleanup_worker is not None:
            self.cleanup_worker.wake_event.set()

    def start(self) -> None:
        self.zk.connect()
        self.zk.add_connection_listener(self._on_connection)
        for provider in self.config.providers:
            driver = registry.get_driver(provider.driver)
            assert driver is not None  # config.load refused unknown drivers
            self.providers[provider.name] = driver.provider(
                provider, self.config.state_dir, self.zk
            )
            for pool in provider.pools:
                self.pool_workers.append(PoolWorker(self, self.providers[provider.name], pool))
        self.cleanup_worker = CleanupWorker(self)
        self.cleanup_worker.reconcile()
        for worker in self.pool_workers:
            worker.register()
        self.watchers = [TreeWatcher(self.zk, r, self.wake) for r in (REQUEST_ROOT, NODE_ROOT)]
        # Builds and their uploads, at any depth: a new one may make a label ready.
        self._unwatch = [
            self.zk.watch_tree(f"{IMAGE_ROOT}/{image.name}", self.wake)
            for image in self.config.diskimages
        ]
        self.watchers.append(TreeWatcher(self.zk, LAUNCHER_ROOT, self.wake, data=False))
        for watcher in self.watchers:
            watcher.start()
        for worker in self.pool_workers:
            worker.start()
        self.cleanup_worker.start()
        if self.metrics is not None:
            self.metrics.start()
        log.info(
            "Nodepool launcher started: %s",
            ", ".join(w.launcher_id for w in self.pool_workers) or "no pools",
        )
        self.wake()

    def _on_connection(self, state: str) -> None:
        if state == "CONNECTED":
            self.wake()

    def stop(self) -> None:
        """Stop serving; running nodes stay up and are adopted on the next start."""
        log.info("Nodepool launcher stopping")
        self.stop_event.set()
        for watcher in self.watchers:
            watcher.stopped = True
        for unwatch in self._unwatch:
            unwatch()
        if self.metrics is not None:
            self.metrics.stop()
        self.wake()

    def join(self) -> None:
        for worker in self.pool_workers:
            if worker.is_alive():
                worker.join()
        if self.cleanup_worker is not None and self.cleanup_worker.is_alive():
            self.cleanup_worker.join()
        for worker in self.pool_workers:
            try:
                self.zk.unregister_launcher(worker.launcher_id)
            except exc.ZKError:
                pass
        self.zk.disconnect()
