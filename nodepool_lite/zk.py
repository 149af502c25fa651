"""The one module that speaks ZooKeeper (a facade over kazoo).

Everything else in the repo stores JSON dicts through the generic API below or
nodepool objects through the nodepool API, and catches `nodepool_lite.exceptions`;
kazoo types never leave this module so the engine can be swapped or mocked in
one place. The nodepool verbs (requests, nodes, launchers, image builds in
Nodepool v3's layout, doc/architecture.md) come from the NodepoolZK mixin in
zk_nodepool.py, which uses only the generic API below.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from kazoo import exceptions as kze
from kazoo.client import KazooClient, KazooState, TransactionRequest
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.recipe.cache import TreeCache, TreeEvent
from kazoo.recipe.lock import Lock as KazooLock
from kazoo.recipe.watchers import ChildrenWatch, DataWatch
from kazoo.retry import KazooRetry

from nodepool_lite import exceptions as exc
from nodepool_lite.tls import TLSFiles, kazoo_args
from nodepool_lite.zk_nodepool import (  # noqa: F401  (the layout's names, re-exported)
    DEFAULT_PRIORITY,
    IMAGE_BUILD_REQUEST_ROOT,
    IMAGE_ROOT,
    LAUNCHER_ROOT,
    NODE_ROOT,
    REQUEST_LOCK_ROOT,
    REQUEST_ROOT,
    NodepoolZK,
)

log = logging.getLogger("nodepool_lite.zk")

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


class _OneTripLock(KazooLock):
    """kazoo's Lock, whose lock dir is made with one create instead of an
    `exists` per missing level (ensure_path), or not at all when the caller
    knows it is there (`dir_exists`; Lock.acquire makes it after all if the
    contender's create finds it missing): a launcher takes two fresh locks on
    the path of every node handout, where each round trip counts."""

    def __init__(self, client: KazooClient, path: str, identifier: str, dir_exists: bool):
        super().__init__(client, path, identifier)
        self.assured_path = dir_exists

    def _ensure_path(self) -> None:
        try:
            self.client.create(self.path, makepath=True)
        except kze.NodeExistsError:
            pass
        self.assured_path = True


class CachedTree:
    """The znodes one level under `root`, kept in memory by kazoo's TreeCache:
    reading them costs no round trip. `listener(kind, child)` hears each change
    of a child (kind "added", "updated", "removed") once the cache holds it,
    and ("reset", "") when the cache reconnected and may have missed some;
    changes deeper down (lock contenders) are not reported."""

    _KINDS = {
        TreeEvent.NODE_ADDED: "added",
        TreeEvent.NODE_UPDATED: "updated",
        TreeEvent.NODE_REMOVED: "removed",
    }

    def __init__(self, client: KazooClient, root: str, listener: Callable[[str, str], None]):
        self.root = root
        self._listener = listener
        self._cache = TreeCache(client, root)
        self._cache.listen(self._on_event)

    def start(self) -> None:
        with _translated():
            self._cache.start()

    def close(self) -> None:
        self._cache.close()

    def children(self) -> list[str]:
        return sorted(self._cache.get_children(self.root) or ())

    def data(self, child: str) -> dict | None:
        """The child's JSON as last seen; None if gone, empty or not JSON."""
        node = self._cache.get_data(f"{self.root}/{child}")
        if node is None or not node.data:
            return None
        try:
            return _decode(node.data)
        except ValueError:
            return None

    def _on_event(self, event: Any) -> None:
        kind = self._KINDS.get(event.event_type)
        if kind is None:
            if event.event_type in (TreeEvent.CONNECTION_RECONNECTED, TreeEvent.INITIALIZED):
                kind = "reset"
            else:
                return
            child = ""
        else:
            relative = event.event_data.path[len(self.root) + 1 :]
            if not relative or "/" in relative:
                return
            child = relative
        try:
            self._listener(kind, child)
        except Exception:
            log.exception("Listener of the cache of %s failed", self.root)


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
            try:
                ok = self._recipe.acquire(blocking=self.blocking, timeout=self.timeout)
            except kze.NoNodeError:
                if not self._recipe.assured_path:
                    raise
                self._recipe.assured_path = False  # the lock dir was not there
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
    """All-or-nothing batch of JSON writes, sent at `commit`."""

    def __init__(self, client: KazooClient):
        self._client = client
        self._ops: list[Callable[[TransactionRequest], None]] = []
        self._last: dict[object, Callable[[Transaction], None]] = {}

    def add_last(self, key: object, add: Callable[[Transaction], None]) -> None:
        """`add(self)` adds its writes just before the commit; of several
        under one `key`, only the last is kept. Writers that each move the
        same znode (a branch head announced once per change reported) then
        move it once, to where the last one says."""
        self._last[key] = add

    def extend(self, other: Transaction) -> None:
        """Take in the writes of `other` (which is not committed then): a
        caller collects each part's writes apart and keeps only the parts
        that went through whole."""
        self._ops.extend(other._ops)
        for key, add in other._last.items():
            self._last[key] = add

    def create(self, path: str, data: dict | None = None, sequence: bool = False) -> None:
        raw = _encode(data)
        self._ops.append(lambda tx: tx.create(path, raw, sequence=sequence))

    def set(self, path: str, data: dict, version: int = -1) -> None:
        raw = _encode(data)
        self._ops.append(lambda tx: tx.set_data(path, raw, version))

    def delete(self, path: str, version: int = -1) -> None:
        self._ops.append(lambda tx: tx.delete(path, version))

    def check(self, path: str, version: int) -> None:
        self._ops.append(lambda tx: tx.check(path, version))

    def commit(self) -> list[Any]:
        last, self._last = self._last, {}
        for add in last.values():
            add(self)
        tx = self._client.transaction()
        for op in self._ops:
            op(tx)
        with _translated():
            results = tx.commit()
        failed = [r for r in results if isinstance(r, Exception)]
        errors = [r for r in failed if not isinstance(r, kze.RolledBackError)]
        if errors:
            raise _translate_error(errors[0])
        if failed:
            raise exc.ZKError("ZooKeeper transaction was rolled back.")
        return results


class ZooKeeper(NodepoolZK):
    """A connection to ZooKeeper; `hosts` may end in a chroot ('h:p/chroot')."""

    def __init__(
        self,
        hosts: str,
        timeout: float = 10.0,
        connect_timeout: float | None = None,
        tls: TLSFiles | None = None,
    ):
        """`timeout` is the session timeout; `connect_timeout` (default 3x) bounds
        connect(): a loaded host's ZooKeeper can take many seconds to answer
        its first session, while a CLI wants to give up quickly. With `tls`
        every connection is TLS with that client certificate."""
        self.hosts = hosts
        self.timeout = timeout
        self.connect_timeout = connect_timeout or 3 * timeout
        self.tls = tls
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
        tls = kazoo_args(self.tls)
        if chroot:
            bootstrap = KazooClient(hosts=servers, timeout=self.timeout, **tls)
            with _translated():
                bootstrap.start(timeout=self.connect_timeout)
                try:
                    bootstrap.ensure_path(chroot)
                finally:
                    bootstrap.stop()
                    bootstrap.close()
        client = KazooClient(
            hosts=self.hosts,
            timeout=self.timeout,
            connection_retry=KazooRetry(max_tries=-1, max_delay=5),
            **tls,
        )
        client.add_listener(self._on_state)
        try:
            with _translated():
                client.start(timeout=self.connect_timeout)
        except exc.ZKError:
            client.close()
            how = " over TLS" if self.tls else ""
            raise exc.ZKError(f"Cannot connect to ZooKeeper at {self.hosts}{how}.") from None
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

    def get_many(self, paths: list[str], versions: bool = False) -> list[Any]:
        """The values of several znodes, read in about one round trip (kazoo's
        asynchronous gets, pipelined on the session): None for a missing
        znode, the ValueError for one that does not hold JSON; with
        `versions`, each value found as (value, version), as `get` gives it."""
        values: list[Any] = []
        with _translated():
            pending = [self._zk.get_async(path) for path in paths]
            for request in pending:
                try:
                    raw, stat = request.get(timeout=self.timeout)
                except kze.NoNodeError:
                    values.append(None)
                    continue
                try:
                    value = _decode(raw)
                except ValueError as error:
                    values.append(error)
                    continue
                values.append((value, stat.version) if versions else value)
        return values

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

    def watch_children(
        self, path: str, callback: Callable[[list[str]], bool | None], ensure: bool = True
    ) -> None:
        """Call `callback(sorted children)` now and on every change; False stops.
        `ensure=False` when the caller knows the znode exists (saves round trips)."""
        if ensure:
            self.ensure_path(path)

        def wrapper(children: list[str]) -> bool | None:
            try:
                return callback(sorted(children))
            except Exception:
                log.exception("Children watch callback on %s failed", path)
                return None

        with _translated():
            ChildrenWatch(self._zk, path, wrapper)

    def watch_tree(self, path: str, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback()` on every change at or below `path` (kazoo's
        TreeCache); returns the function that stops watching."""
        cache = TreeCache(self._zk, path)

        def listener(event: Any) -> None:
            try:
                callback()
            except Exception:
                log.exception("Tree watch callback on %s failed", path)

        cache.listen(listener)
        with _translated():
            cache.start()
        return cache.close

    def cached_tree(self, root: str, listener: Callable[[str, str], None]) -> CachedTree:
        """A not-yet-started CachedTree of `root` on this session."""
        return CachedTree(self._zk, root, listener)

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
        dir_exists: bool = False,
    ) -> Lock:
        """A not-yet-acquired lock; use `with zk.lock(p):` or acquire()/release().
        `dir_exists` when the lock's znode is most likely there (one round trip
        fewer; made all the same if it is not)."""
        return Lock(_OneTripLock(self._zk, path, identifier, dir_exists), path, blocking, timeout)

    def transaction(self) -> Transaction:
        return Transaction(self._zk)
