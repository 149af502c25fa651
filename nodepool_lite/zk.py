"""The one module that speaks ZooKeeper (a facade over kazoo).

Everything else in the repo stores JSON dicts through the generic API below or
nodepool objects through the nodepool API, and catches `nodepool_lite.exceptions`;
kazoo types never leave this module so the engine can be swapped or mocked in
one place. The layout is Nodepool v3's (see doc/architecture.md).
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from kazoo import exceptions as kze
from kazoo.client import KazooClient, KazooState
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.recipe.lock import Lock as KazooLock
from kazoo.recipe.watchers import ChildrenWatch, DataWatch
from kazoo.retry import KazooRetry

from nodepool_lite import exceptions as exc
from nodepool_lite.model import BuildState, ImageBuild, Node, NodeRequest, RequestState

log = logging.getLogger("nodepool_lite.zk")

REQUEST_ROOT = "/nodepool/requests"
REQUEST_LOCK_ROOT = "/nodepool/requests-lock"
NODE_ROOT = "/nodepool/nodes"
LAUNCHER_ROOT = "/nodepool/launchers"
IMAGE_ROOT = "/nodepool/images"
IMAGE_BUILD_REQUEST_ROOT = "/nodepool/image-build-requests"
DEFAULT_PRIORITY = "100"

F = TypeVar("F", bound=Callable[..., Any])


def _translate_error(error: Exception) -> exc.ZKError:
    mapping: list[tuple[type[Exception], type[exc.ZKError]]] = [
        (kze.NoNodeError, exc.NoNodeError),
        (kze.NodeExistsError, exc.NodeExistsError),
        (kze.BadVersionError, exc.BadVersionError),
        (kze.LockTimeout, exc.LockError),
    ]
    for kazoo_type, ours in mapping:
        if isinstance(error, kazoo_type):
            return ours(f"ZooKeeper: {type(error).__name__} {error}".strip())
    return exc.ZKError(f"ZooKeeper: {type(error).__name__} {error}".strip())


@contextmanager
def _translated() -> Iterator[None]:
    try:
        yield
    except (kze.KazooException, KazooTimeoutError) as error:
        raise _translate_error(error) from error


def translated(func: F) -> F:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _translated():
            return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _encode(data: dict | None) -> bytes:
    return b"" if data is None else json.dumps(data, sort_keys=True).encode()


def _decode(raw: bytes | None) -> dict:
    return json.loads(raw) if raw else {}


def _split_hosts(hosts: str) -> tuple[str, str]:
    """'h1:p,h2:p/chroot' -> ('h1:p,h2:p', '/chroot')."""
    servers, sep, chroot = hosts.partition("/")
    return servers, ("/" + chroot.strip("/")) if sep and chroot.strip("/") else ""


def _refresh(obj: Any, fresh: Any) -> None:
    """Copy the stored fields of `fresh` into `obj`; the stored state is the
    truth, so this bypasses the transition check."""
    for name, value in fresh.to_dict().items():
        object.__setattr__(obj, name, type(obj).STATES(value) if name == "state" else value)


class Lock:
    """A kazoo Lock recipe that raises LockError instead of returning False."""

    def __init__(self, recipe: KazooLock, path: str, blocking: bool, timeout: float | None):
        self._recipe = recipe
        self.path = path
        self.blocking = blocking
        self.timeout = timeout

    @translated
    def acquire(self) -> None:
        try:
            ok = self._recipe.acquire(blocking=self.blocking, timeout=self.timeout)
        except kze.LockTimeout as error:
            raise exc.LockError(f"Timed out waiting for the lock {self.path}.") from error
        if not ok:
            raise exc.LockError(f"The lock {self.path} is held by someone else.")

    @translated
    def release(self) -> None:
        self._recipe.release()

    @property
    def is_acquired(self) -> bool:
        return bool(self._recipe.is_acquired)

    def contenders(self) -> list[str]:
        with _translated():
            return list(self._recipe.contenders())

    def __enter__(self) -> Lock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class Transaction:
    """All-or-nothing batch of JSON writes."""

    def __init__(self, client: KazooClient):
        self._tx = client.transaction()

    def create(self, path: str, data: dict | None = None) -> None:
        self._tx.create(path, _encode(data))

    def set(self, path: str, data: dict, version: int = -1) -> None:
        self._tx.set_data(path, _encode(data), version)

    def delete(self, path: str, version: int = -1) -> None:
        self._tx.delete(path, version)

    def check(self, path: str, version: int) -> None:
        self._tx.check(path, version)

    def commit(self) -> list[Any]:
        with _translated():
            results = self._tx.commit()
        failed = [r for r in results if isinstance(r, Exception)]
        errors = [r for r in failed if not isinstance(r, kze.RolledBackError)]
        if errors:
            raise _translate_error(errors[0])
        if failed:
            raise exc.ZKError("ZooKeeper transaction was rolled back.")
        return results


class ZooKeeper:
    """A connection to ZooKeeper; `hosts` may end in a chroot ('h:p/chroot')."""

    def __init__(self, hosts: str, timeout: float = 10.0):
        self.hosts = hosts
        self.timeout = timeout
        self.client: KazooClient | None = None
        self._listeners: list[Callable[[str], None]] = []
        self._launchers: dict[str, list[str]] = {}
        self._lost = False

    # -- connection ---------------------------------------------------------

    def connect(self) -> None:
        """Connect (creating the chroot if needed); retries forever once up."""
        if self.client is not None:
            return
        servers, chroot = _split_hosts(self.hosts)
        if chroot:
            bootstrap = KazooClient(hosts=servers, timeout=self.timeout)
            with _translated():
                bootstrap.start(timeout=self.timeout)
                try:
                    bootstrap.ensure_path(chroot)
                finally:
                    bootstrap.stop()
                    bootstrap.close()
        client = KazooClient(
            hosts=self.hosts,
            timeout=self.timeout,
            connection_retry=KazooRetry(max_tries=-1, max_delay=5),
        )
        client.add_listener(self._on_state)
        try:
            with _translated():
                client.start(timeout=self.timeout)
        except exc.ZKError:
            client.close()
            raise exc.ZKError(f"Cannot connect to ZooKeeper at {self.hosts}.") from None
        self.client = client

    def disconnect(self) -> None:
        if self.client is None:
            return
        client, self.client = self.client, None
        client.stop()
        client.close()

    @property
    def connected(self) -> bool:
        return self.client is not None and self.client.state == KazooState.CONNECTED

    def add_connection_listener(self, callback: Callable[[str], None]) -> None:
        """`callback("CONNECTED"|"SUSPENDED"|"LOST")` from kazoo's thread: must not block."""
        self._listeners.append(callback)

    def _on_state(self, state: str) -> None:
        if state == KazooState.LOST:
            self._lost = True
        elif state == KazooState.CONNECTED and self._lost:
            # A new session lost our ephemeral launcher registrations.
            self._lost = False
            threading.Thread(
                target=self._reregister_launchers, name="zk-reregister", daemon=True
            ).start()
        for callback in list(self._listeners):
            try:
                callback(str(state))
            except Exception:
                log.exception("Connection listener %r failed", callback)

    @property
    def _zk(self) -> KazooClient:
        if self.client is None:
            raise exc.ZKError("Not connected to ZooKeeper (call connect() first).")
        return self.client

    # -- generic JSON API ---------------------------------------------------

    @translated
    def create(
        self,
        path: str,
        data: dict | None = None,
        *,
        sequence: bool = False,
        ephemeral: bool = False,
        makepath: bool = True,
    ) -> str:
        return self._zk.create(
            path, _encode(data), sequence=sequence, ephemeral=ephemeral, makepath=makepath
        )

    @translated
    def get(self, path: str) -> tuple[dict, int]:
        raw, stat = self._zk.get(path)
        return _decode(raw), stat.version

    def get_or_none(self, path: str) -> dict | None:
        try:
            return self.get(path)[0]
        except exc.NoNodeError:
            return None

    @translated
    def set(self, path: str, data: dict, version: int = -1) -> int:
        return self._zk.set(path, _encode(data), version=version).version

    @translated
    def delete(self, path: str, recursive: bool = False, version: int = -1) -> None:
        try:
            self._zk.delete(path, version=version, recursive=recursive)
        except kze.NoNodeError:
            pass

    @translated
    def exists(self, path: str) -> bool:
        return self._zk.exists(path) is not None

    @translated
    def get_children(self, path: str) -> list[str]:
        try:
            return sorted(self._zk.get_children(path))
        except kze.NoNodeError:
            return []

    @translated
    def ensure_path(self, path: str) -> None:
        self._zk.ensure_path(path)

    def watch_children(self, path: str, callback: Callable[[list[str]], bool | None]) -> None:
        """Call `callback(sorted children)` now and on every change; False stops."""
        self.ensure_path(path)

        def wrapper(children: list[str]) -> bool | None:
            try:
                return callback(sorted(children))
            except Exception:
                log.exception("Children watch callback on %s failed", path)
                return None

        with _translated():
            ChildrenWatch(self._zk, path, wrapper)

    def watch_data(self, path: str, callback: Callable[[dict | None, int | None], bool | None]):
        """Call `callback(data, version)` now and on every change (None, None when
        the znode does not exist); False stops."""

        def wrapper(raw: bytes | None, stat: Any) -> bool | None:
            try:
                if stat is None:
                    return callback(None, None)
                return callback(_decode(raw), stat.version)
            except Exception:
                log.exception("Data watch callback on %s failed", path)
                return None

        with _translated():
            DataWatch(self._zk, path, wrapper)

    def lock(
        self,
        path: str,
        identifier: str = "",
        blocking: bool = True,
        timeout: float | None = None,
    ) -> Lock:
        """A not-yet-acquired lock; use `with zk.lock(p):` or acquire()/release()."""
        return Lock(KazooLock(self._zk, path, identifier), path, blocking, timeout)

    def transaction(self) -> Transaction:
        return Transaction(self._zk)

    # -- node requests ------------------------------------------------------

    def _request_path(self, request_id: str) -> str:
        return f"{REQUEST_ROOT}/{request_id}"

    def submit_node_request(
        self,
        req: NodeRequest,
        watcher: Callable[[NodeRequest | None], bool | None] | None = None,
        priority: str = DEFAULT_PRIORITY,
    ) -> str:
        """Create the ephemeral request (it vanishes if the requestor dies) and
        optionally watch it: `watcher(refreshed request)`, `watcher(None)` once
        it is deleted; returning False stops the watch."""
        req.state = RequestState.REQUESTED
        path = self.create(
            f"{REQUEST_ROOT}/{priority}-", req.to_dict(), sequence=True, ephemeral=True
        )
        req.id = path.rsplit("/", 1)[1]
        if watcher is not None:
            request_id = req.id

            def on_data(data: dict | None, version: int | None) -> bool | None:
                if data is None:
                    watcher(None)
                    return False
                return watcher(NodeRequest.from_dict(data, id=request_id))

            self.watch_data(path, on_data)
        return req.id

    def get_node_request(self, request_id: str) -> NodeRequest | None:
        data = self.get_or_none(self._request_path(request_id))
        return None if data is None else NodeRequest.from_dict(data, id=request_id)

    def store_node_request(self, req: NodeRequest) -> None:
        if req.id is None:
            self.submit_node_request(req)
        else:
            self.set(self._request_path(req.id), req.to_dict())

    def delete_node_request(self, req: NodeRequest) -> None:
        if req.id is not None:
            self.delete(self._request_path(req.id))
            self.delete(f"{REQUEST_LOCK_ROOT}/{req.id}", recursive=True)

    def lock_node_request(
        self, req: NodeRequest, blocking: bool = True, timeout: float | None = None
    ) -> None:
        """Lock and refresh `req`; NoNodeError if it vanished meanwhile."""
        lock = self.lock(f"{REQUEST_LOCK_ROOT}/{req.id}", blocking=blocking, timeout=timeout)
        lock.acquire()
        fresh = self.get_node_request(req.id or "")
        if fresh is None:
            lock.release()
            self.delete(f"{REQUEST_LOCK_ROOT}/{req.id}", recursive=True)
            raise exc.NoNodeError(f"Node request {req.id} no longer exists.")
        _refresh(req, fresh)
        req.lock = lock

    def unlock_node_request(self, req: NodeRequest) -> None:
        if req.lock is not None:
            req.lock.release()
            req.lock = None

    def node_request_ids(self) -> list[str]:
        return self.get_children(REQUEST_ROOT)

    def request_lock_ids(self) -> list[str]:
        """Lock dirs, for cleaning up those whose request is gone."""
        return self.get_children(REQUEST_LOCK_ROOT)

    def delete_request_lock(self, request_id: str) -> None:
        self.delete(f"{REQUEST_LOCK_ROOT}/{request_id}", recursive=True)

    # -- nodes --------------------------------------------------------------

    def _node_path(self, node_id: str) -> str:
        return f"{NODE_ROOT}/{node_id}"

    def get_node(self, node_id: str) -> Node | None:
        data = self.get_or_none(self._node_path(node_id))
        # A znode without data is a lock dir left behind by a deleted node.
        return Node.from_dict(data, id=node_id) if data else None

    def store_node(self, node: Node) -> str:
        """Create (new 10-digit id when node.id is None) or update; NoNodeError
        if the node was deleted."""
        if node.id is None:
            path = self.create(f"{NODE_ROOT}/", node.to_dict(), sequence=True)
            node.id = path.rsplit("/", 1)[1]
        else:
            # No create here: a node deleted meanwhile must not come back.
            self.set(self._node_path(node.id), node.to_dict())
        return node.id

    def lock_node(self, node: Node, blocking: bool = True, timeout: float | None = None) -> None:
        """Lock and refresh `node`; NoNodeError if it was deleted meanwhile."""
        path = self._node_path(node.id or "")
        lock = self.lock(f"{path}/lock", blocking=blocking, timeout=timeout)
        lock.acquire()
        fresh = self.get_node(node.id or "")
        if fresh is None:
            lock.release()
            # The lock recipe recreated the node path; remove that ghost.
            self.delete(path, recursive=True)
            raise exc.NoNodeError(f"Node {node.id} no longer exists.")
        _refresh(node, fresh)
        node.lock = lock

    def unlock_node(self, node: Node) -> None:
        if node.lock is not None:
            node.lock.release()
            node.lock = None

    def delete_node(self, node: Node) -> None:
        if node.id is not None:
            self.delete(self._node_path(node.id), recursive=True)

    def node_ids(self) -> list[str]:
        return self.get_children(NODE_ROOT)

    def nodes(self) -> list[Node]:
        return [n for n in (self.get_node(i) for i in self.node_ids()) if n is not None]

    # -- launchers ----------------------------------------------------------

    def register_launcher(self, name: str, labels: list[str]) -> None:
        """Ephemeral registration; re-created automatically after a session loss."""
        self._launchers[name] = list(labels)
        data = {"supported_labels": sorted(labels)}
        path = f"{LAUNCHER_ROOT}/{name}"
        try:
            self.create(path, data, ephemeral=True)
        except exc.NodeExistsError:
            self.set(path, data)

    def unregister_launcher(self, name: str) -> None:
        self._launchers.pop(name, None)
        self.delete(f"{LAUNCHER_ROOT}/{name}")

    def get_launchers(self) -> dict[str, list[str]]:
        """name -> labels it supports, for every live launcher."""
        out = {}
        for name in self.get_children(LAUNCHER_ROOT):
            data = self.get_or_none(f"{LAUNCHER_ROOT}/{name}")
            if data is not None:
                out[name] = list(data.get("supported_labels", []))
        return out

    def _reregister_launchers(self) -> None:
        for name, labels in list(self._launchers.items()):
            try:
                self.register_launcher(name, labels)
            except exc.ZKError:
                log.exception("Could not re-register launcher %s", name)

    # -- image builds -------------------------------------------------------

    def _builds_path(self, image: str) -> str:
        return f"{IMAGE_ROOT}/{image}/builds"

    def store_image_build(self, image_name: str, build: ImageBuild) -> str:
        """Create (new sequence id when build.id is None) or update; returns the id."""
        build.image = image_name
        if build.id is None:
            path = self.create(f"{self._builds_path(image_name)}/", build.to_dict(), sequence=True)
            build.id = path.rsplit("/", 1)[1]
        else:
            path = f"{self._builds_path(image_name)}/{build.id}"
            try:
                self.set(path, build.to_dict())
            except exc.NoNodeError:
                self.create(path, build.to_dict())
        return build.id

    def get_image_build(self, image_name: str, build_id: str) -> ImageBuild | None:
        data = self.get_or_none(f"{self._builds_path(image_name)}/{build_id}")
        if not data:
            return None
        build = ImageBuild.from_dict(data, id=build_id)
        build.image = image_name
        return build

    def get_image_builds(
        self, image_name: str, states: list[BuildState] | None = None
    ) -> list[ImageBuild]:
        """Oldest first."""
        builds = []
        for build_id in self.get_children(self._builds_path(image_name)):
            build = self.get_image_build(image_name, build_id)
            if build is not None and (states is None or build.state in states):
                builds.append(build)
        return builds

    def get_most_recent_image_build(
        self, image_name: str, state: BuildState = BuildState.READY
    ) -> ImageBuild | None:
        builds = self.get_image_builds(image_name, [state])
        return builds[-1] if builds else None

    def get_image_names(self) -> list[str]:
        return self.get_children(IMAGE_ROOT)

    def delete_image_build(self, image_name: str, build_id: str) -> None:
        self.delete(f"{self._builds_path(image_name)}/{build_id}", recursive=True)

    def request_image_build(self, image_name: str) -> None:
        try:
            self.create(f"{IMAGE_BUILD_REQUEST_ROOT}/{image_name}", {"time": time.time()})
        except exc.NodeExistsError:
            pass

    def get_image_build_requests(self) -> list[str]:
        return self.get_children(IMAGE_BUILD_REQUEST_ROOT)

    def remove_image_build_request(self, image_name: str) -> None:
        self.delete(f"{IMAGE_BUILD_REQUEST_ROOT}/{image_name}")

    def lock_image(
        self,
        image_name: str,
        identifier: str = "",
        blocking: bool = True,
        timeout: float | None = None,
    ) -> Lock:
        """Acquired lock that one builder holds while it builds `image_name`."""
        lock = self.lock(f"{IMAGE_ROOT}/{image_name}/lock", identifier, blocking, timeout)
        lock.acquire()
        return lock
