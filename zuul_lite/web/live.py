"""The status page's live feed: server-sent events with the whole status,
sent again whenever a pipeline changes in ZooKeeper.

One tree watch on the pipelines serves every browser, and the status is read
once per change however many follow it, so a busy page costs ZooKeeper the
same as one reader.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from zuul_lite.state import ZuulState

KEEPALIVE = 20.0  # seconds between comment events on a quiet stream


class StatusFeed:
    """`read` gives the status as /api/status has it (the queues, and what
    the web adds from the history); by default the queues with `now`."""

    def __init__(self, state: ZuulState, read: Callable[[], dict[str, Any]] | None = None) -> None:
        self.state = state
        self.read = read or (lambda: {**state.read_status(), "now": time.time()})
        self.version = 0
        self._changed = threading.Condition()
        self._lock = threading.Lock()  # one watch, one read per version
        self._started = False
        self._snapshot: tuple[int, bytes] | None = None
        self._stop_watch = None

    def _on_change(self) -> None:
        with self._changed:
            self.version += 1
            self._changed.notify_all()

    def start(self) -> None:
        """Watch from the first follower on: a web nobody follows watches nothing."""
        with self._lock:
            if not self._started:
                # The builds too: a launcher taking a build (its `running`
                # claim) turns it from waiting in Gearman to running.
                stops = [
                    self.state.watch_pipelines(self._on_change),
                    self.state.watch_builds(self._on_change),
                ]
                self._stop_watch = lambda: [stop() for stop in stops]
                self._started = True

    def stop(self) -> None:
        with self._lock:
            if self._stop_watch is not None:
                self._stop_watch()
            self._stop_watch = None
            self._started = False

    def wait(self, seen: int, timeout: float) -> int:
        with self._changed:
            self._changed.wait_for(lambda: self.version != seen, timeout)
            return self.version

    def snapshot(self) -> tuple[int, bytes]:
        """The current status as one SSE event, read once for each change."""
        with self._lock:
            version = self.version
            if self._snapshot is None or self._snapshot[0] != version:
                status = self.read()
                self._snapshot = (version, b"data: " + json.dumps(status).encode() + b"\n\n")
            return self._snapshot

    def events(self) -> Iterator[bytes]:
        self.start()
        seen = -1
        while True:
            version, event = self.snapshot()
            if version != seen:
                seen = version
                yield event
            if self.wait(seen, KEEPALIVE) == seen:
                yield b": keepalive\n\n"


def make_router(feed: StatusFeed) -> APIRouter:
    router = APIRouter()

    @router.get("/api/status/stream")
    def status_stream() -> StreamingResponse:
        """text/event-stream: the status as /api/status has it, then again at each change."""
        return StreamingResponse(
            feed.events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return router
