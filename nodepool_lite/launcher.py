"""The nodepool launcher daemon: turns node requests into nodes, and used nodes
into nothing.

Threads (each waits on its own wake event, set by ZooKeeper watches, so there
is no polling; a long safety tick only covers watches lost with a session):

- one PoolWorker per provider pool: serves, declines or queues requests;
- one NodeLauncher per accepted request: boots its nodes, fulfils it;
- the CleanupWorker (cleanup.py): destroys used, failed and orphaned nodes;
- the MinReadyWorker (min_ready.py): asks for the ready nodes `min-ready` keeps.

A pool that cannot serve a request (label not offered, launches failed
`launch-retries` times) declines it with a reason and leaves it to the
others; it fails, with every pool's reason, once all have declined.

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
from nodepool_lite import min_ready
from nodepool_lite.cleanup import CleanupWorker
from nodepool_lite.drivers import registry
from nodepool_lite.drivers.base import PoolConfig, Provider
from nodepool_lite.metrics import MetricsServer, StateCollector
from nodepool_lite.min_ready import MinReadyWorker
from nodepool_lite.model import Node, NodeRequest, NodeState, RequestState
from nodepool_lite.worker import BaseWorker
from nodepool_lite.zk import IMAGE_ROOT, LAUNCHER_ROOT, ZooKeeper
from nodepool_lite.zk_cache import StateCache

log = logging.getLogger("nodepool_lite.launcher")


class NodeLauncher(threading.Thread):
    """Boots the nodes of one accepted request (holding its lock and theirs)."""

    def __init__(self, worker: PoolWorker, req: NodeRequest, nodes: list[Node]):
        super().__init__(name=f"NodeLauncher-{req.id}", daemon=True)
        self.worker = worker
        self.zk = worker.zk
        self.req = req
        self.nodes = nodes  # `building` ones are booted here; `ready` ones are spares
        self.spares = {n.id for n in nodes if n.state == NodeState.READY}
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
        error = None
        for node in self.nodes:
            if node.state == NodeState.BUILDING:
                error = self._launch(node)
                if error:
                    error = f"node {node.id} ({node.type}): {error}"
                    break
        if self.zk.get_node_request(self.req.id or "") is None:
            self.log.info(
                "Request %s vanished (requestor gone); discarding its nodes", self.req.id
            )
            self._discard_ready()
            return
        try:
            if error:
                self._discard_ready()
                # Another pool offering the labels may still serve it.
                self.worker.decline(self.req, self.zk.get_launchers(), error)
            elif min_ready.is_min_ready(self.req):
                min_ready.release_nodes(self.zk, self.req, self.nodes)
                self.log.info("Ready nodes %s kept for min-ready", [n.id for n in self.nodes])
            else:
                # As Nodepool: fulfilled first, nodes unlocked after (run's
                # finally); the requestor's lock on them waits that long.
                self.req.nodes = [n.id for n in self.nodes if n.id]
                self.req.state = RequestState.FULFILLED
                self.zk.store_node_request(self.req)
                self.log.info("Request %s fulfilled: nodes %s", self.req.id, self.req.nodes)
        except exc.NoNodeError:
            self.log.info("Request %s vanished before it was fulfilled", self.req.id)

    def _discard_ready(self) -> None:
        """Nodes booted for this request are destroyed; spares it was given
        are handed back."""
        for node in self.nodes:
            if node.id in self.spares:
                node.allocated_to = None
                self.zk.store_node(node)
            elif node.state in (NodeState.READY, NodeState.BUILDING):
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

    @property
    def key(self) -> str:
        """`<provider>/<pool>`: how requests name this pool in their declines."""
        return f"{self.provider.provider.name}/{self.pool.name}"

    def _pool_nodes(self, nodes: list[Node]) -> list[Node]:
        name = self.provider.provider.name
        return [n for n in nodes if n.provider == name and n.pool == self.pool.name]

    def _process_requests(self) -> None:
        # From the cache: each request and spare is locked and read again
        # before it is changed, and capacity is counted from ZooKeeper itself.
        # "<priority>-<sequence>": jobs' requests before min-ready's, oldest first.
        cache = self.nodepool.cache
        assert cache is not None  # started before the workers
        pool_nodes = None
        for req in cache.requests():
            if self.stop_event.is_set():
                return
            if req.state == RequestState.PENDING:
                self._recover_lost(req)
                continue
            if req.state != RequestState.REQUESTED:
                continue
            if self.launcher_id in req.declined_by:
                launchers = self.zk.get_launchers()
                if set(launchers) <= set(req.declined_by):
                    self._decline(req, launchers)  # a launcher that could serve it left
                continue
            why_not = self._why_not(req.node_types)
            if why_not:
                self._decline(req, self.zk.get_launchers(), why_not)
                continue
            if pool_nodes is None:
                pool_nodes = self._pool_nodes(cache.nodes())
            spares = [] if min_ready.is_min_ready(req) else self._spares(req, pool_nodes)
            rest = list(req.node_types)
            for node in spares:
                rest.remove(node.type)
            if rest and not self.handler.ready(rest):
                self.log.debug("Request %s waits for an image of %s", req.id, rest)
                continue
            if rest:
                # The cache may not hold a node launched a moment ago yet.
                pool_nodes = self._pool_nodes(self.zk.nodes())
                if not self.handler.has_capacity(rest, len(pool_nodes)):
                    # First come, first served: later requests wait too.
                    self.log.debug("Request %s waits for capacity", req.id)
                    return
            self._accept(req, spares, rest)
            pool_nodes = None  # changed by this request

    def _why_not(self, labels: list[str]) -> str | None:
        """Why this pool can never serve `labels` together, or None."""
        if self.handler.serves(labels):
            return None
        missing = [label for label in labels if label not in self.pool.labels]
        if missing:
            return f"does not offer label {missing[0]}"
        return f"{len(labels)} nodes exceed its max-servers {self.pool.max_servers}"

    def _spares(self, req: NodeRequest, pool_nodes: list[Node]) -> list[Node]:
        """Unlocked candidates among this pool's ready unallocated nodes, one
        per label of `req` where there is one."""
        free = [n for n in pool_nodes if min_ready.is_spare(n)]
        picked = []
        for label in req.node_types:
            node = next((n for n in free if n.type == label), None)
            if node is not None:
                free.remove(node)
                picked.append(node)
        return picked

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
        except exc.NoNodeError:
            self.log.info("Request %s vanished before it was requeued", req.id)
        finally:
            self.zk.unlock_node_request(req)

    def _decline(
        self, req: NodeRequest, launchers: dict[str, list[str]], reason: str | None = None
    ) -> None:
        if not self._try_lock(req):
            return
        try:
            if req.state == RequestState.REQUESTED:
                self.decline(req, launchers, reason)
        finally:
            self.zk.unlock_node_request(req)

    def decline(
        self, req: NodeRequest, launchers: dict[str, list[str]], reason: str | None
    ) -> None:
        """Record on the locked `req` that this pool cannot serve it (and why);
        it fails with every pool's reason once all live pools declined it,
        else it goes back to the others."""
        if self.launcher_id not in req.declined_by:
            req.declined_by.append(self.launcher_id)
        if reason is not None:
            req.declined_reasons[self.key] = reason
        if set(launchers) | {self.launcher_id} <= set(req.declined_by):
            req.state = RequestState.FAILED
            req.reason = _decline_reason(req, launchers)
            self.log.warning("Request %s failed: %s", req.id, req.reason)
        else:
            req.state = RequestState.REQUESTED
            self.log.info("Declined request %s: %s", req.id, reason)
        self.zk.store_node_request(req)

    def _lock_spares(self, req: NodeRequest, spares: list[Node]) -> list[Node] | None:
        """Lock and allocate `spares` to `req`; None (all unlocked) when one
        was taken meanwhile: the request is looked at again on the next pass."""
        locked: list[Node] = []
        for node in spares:
            try:
                self.zk.lock_node(node, blocking=False)
            except (exc.LockError, exc.NoNodeError):
                break
            locked.append(node)
            if not min_ready.is_spare(node):
                break
        else:
            for node in locked:
                node.allocated_to = req.id
            return locked
        for node in locked:
            self.zk.unlock_node(node)
        self.nodepool.wake()
        return None

    def _accept(self, req: NodeRequest, spares: list[Node], rest: list[str]) -> None:
        if not self._try_lock(req):
            return
        if req.state != RequestState.REQUESTED or self.launcher_id in req.declined_by:
            self.zk.unlock_node_request(req)
            return
        nodes = self._lock_spares(req, spares) if spares else []
        if nodes is None:
            self.zk.unlock_node_request(req)
            return
        if not rest:
            self._fulfil_from_spares(req, nodes)
            return
        try:
            for node in nodes:
                self.zk.store_node(node)  # the spares' allocation
            req.state = RequestState.PENDING
            self.zk.store_node_request(req)
            for label in rest:
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
        self.log.info(
            "Request %s accepted: launching nodes %s beside ready nodes %s",
            req.id, [n.id for n in nodes if n.state == NodeState.BUILDING],
            [n.id for n in spares],
        )  # fmt: skip
        launcher = NodeLauncher(self, req, nodes)
        with self._launchers_lock:
            self.launchers.add(launcher)
        launcher.start()

    def _fulfil_from_spares(self, req: NodeRequest, nodes: list[Node]) -> None:
        """Every label has a ready node: the request is fulfilled in this pass."""
        try:
            req.nodes = [n.id for n in nodes if n.id]
            req.state = RequestState.FULFILLED
            self.zk.fulfil_node_request(req, nodes)
            self.log.info("Request %s fulfilled with ready nodes %s", req.id, req.nodes)
        finally:
            # After the request, as for launched nodes: the requestor's lock waits.
            for node in nodes:
                self.zk.unlock_node(node)
            self.zk.unlock_node_request(req)
        self.nodepool.wake()  # min-ready asks for replacements


def _decline_reason(req: NodeRequest, launchers: dict[str, list[str]]) -> str:
    offered = {label for labels in launchers.values() for label in labels}
    missing = [label for label in req.node_types if label not in offered]
    if missing:
        return f"no provider offers label {missing[0]}"
    if req.declined_reasons:
        reasons = "; ".join(f"{k}: {v}" for k, v in sorted(req.declined_reasons.items()))
        return f"every provider pool declined: {reasons}"
    return f"no provider pool can serve node types {', '.join(req.node_types)} together"


class NodePool:
    """The daemon: `start()`, `stop()`, `join()`; owns its ZooKeeper session."""

    def __init__(self, config: str | Path | npconfig.Config, zk_hosts: str | None = None):
        # A Config as loaded (a reload hands over the one it checked, so a
        # file changed in between cannot stop the daemon), or its path.
        self.config = config if isinstance(config, npconfig.Config) else npconfig.load(config)
        self.zk = ZooKeeper(zk_hosts or self.config.zookeeper_hosts, tls=self.config.zookeeper_tls)
        self.stop_event = threading.Event()
        self.providers: dict[str, Provider] = {}
        self.pool_workers: list[PoolWorker] = []
        self.cleanup_worker: CleanupWorker | None = None
        self.min_ready_worker: MinReadyWorker | None = None
        self.cache: StateCache | None = None
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

    def wake_pools(self) -> None:
        for worker in self.pool_workers:
            worker.wake_event.set()

    def wake(self) -> None:
        self.wake_pools()
        for other in (self.cleanup_worker, self.min_ready_worker):
            if other is not None:
                other.wake_event.set()

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
        self.min_ready_worker = MinReadyWorker(self)
        self.cleanup_worker.reconcile()
        for worker in self.pool_workers:
            worker.register()
        self.cache = StateCache(self.zk, on_new_request=self.wake_pools, on_change=self.wake)
        self.cache.start()
        # Builds and their uploads, at any depth: a new one may make a label ready.
        self._unwatch = [self.cache.close] + [
            self.zk.watch_tree(f"{IMAGE_ROOT}/{image.name}", self.wake)
            for image in self.config.diskimages
        ]
        self.zk.watch_children(LAUNCHER_ROOT, self._launchers_changed)
        for worker in self.pool_workers:
            worker.start()
        self.cleanup_worker.start()
        self.min_ready_worker.start()
        if self.metrics is not None:
            self.metrics.start()
        log.info(
            "Nodepool launcher started: %s",
            ", ".join(w.launcher_id for w in self.pool_workers) or "no pools",
        )
        self.wake()

    def _launchers_changed(self, children: list[str]) -> bool | None:
        if self.stop_event.is_set():
            return False
        self.wake()
        return None

    def _on_connection(self, state: str) -> None:
        if state == "CONNECTED":
            self.wake()

    def stop(self) -> None:
        """Stop serving; running nodes stay up and are adopted on the next start."""
        log.info("Nodepool launcher stopping")
        self.stop_event.set()
        for unwatch in self._unwatch:
            unwatch()
        if self.metrics is not None:
            self.metrics.stop()
        self.wake()

    def join(self) -> None:
        for worker in self.pool_workers:
            if worker.is_alive():
                worker.join()
        for other in (self.cleanup_worker, self.min_ready_worker):
            if other is not None and other.is_alive():
                other.join()
        for worker in self.pool_workers:
            try:
                self.zk.unregister_launcher(worker.launcher_id)
            except exc.ZKError:
                pass
        self.zk.disconnect()
