"""Live status over server-sent events: `/api/status/stream`.

One ZooKeeper tree watch per web process on the pipelines and the builds
(started with the first subscriber) wakes every open stream; each reads the
status again and sends it if it changed. Nothing polls: a stream waits on
its wake-up, sending a comment line every KEEPALIVE seconds so proxies keep
the connection. Stopping the web closes every stream at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio

from nodepool_lite.exceptions import ZKError
from nodepool_lite.zk import ZooKeeper
from zuul_lite.state import BUILDS, PIPELINES

log = logging.getLogger("zuul_lite.web.live")

KEEPALIVE = 15.0
RETRY_MS = 3000  # how soon a browser reconnects after the stream ends


class StatusStreams:
    """The wake-ups of every open stream, fed by ZooKeeper watches."""

    def __init__(self, zk: ZooKeeper) -> None:
        self.zk = zk
        self._lock = threading.Lock()
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self._unwatch: list[Callable[[], None]] = []
        self.closed = False

    def _watch(self) -> None:
        """Start the tree watches once (they survive session losses: kazoo's TreeCache)."""
        with self._lock:
            if self._unwatch or self.closed:
                return
            for path in (PIPELINES, BUILDS):
                self.zk.ensure_path(path)
                self._unwatch.append(self.zk.watch_tree(path, self._changed))

    def _changed(self) -> None:
        with self._lock:
            waiters = list(self._waiters)
        for loop, event in waiters:
            loop.call_soon_threadsafe(event.set)

    def close(self) -> None:
        """Stop watching and end every stream (the web server is stopping)."""
        with self._lock:
            self.closed = True
            unwatch, self._unwatch = self._unwatch, []
        for stop in unwatch:
            stop()
        self._changed()

    async def stream(self, read: Callable[[], dict[str, Any]]) -> AsyncIterator[str]:
        """SSE lines: the status now, then each time it changes."""
        await anyio.to_thread.run_sync(self._watch)
        event = asyncio.Event()
        waiter = (asyncio.get_running_loop(), event)
        with self._lock:
            self._waiters.add(waiter)
        last = None
        try:
            yield f"retry: {RETRY_MS}\n\n"
            while not self.closed:
                event.clear()
                try:
                    status = await anyio.to_thread.run_sync(read)
                except ZKError as error:
                    status = {"error": str(error)}
                # `now` moves on every read: a change is anything else.
                key = json.dumps({k: v for k, v in status.items() if k != "now"}, sort_keys=True)
                if key != last:
                    last = key
                    yield f"data: {json.dumps(status)}\n\n"
                try:
                    await asyncio.wait_for(event.wait(), KEEPALIVE)
                except TimeoutError:
                    yield ": keep-alive\n\n"
        finally:
            with self._lock:
                self._waiters.discard(waiter)
