"""The per-build logger: every line of a build says which event and build it serves.

`[e: <event id>] [build: <uuid>]` as Zuul prints it, so one grep follows a
patch from its trigger event through the scheduler and the launcher to the
vote. A request without an event id (an old scheduler, a test) drops `[e: ]`.
"""

from __future__ import annotations

import logging
from typing import Any

from zuul_lite.build_contract import BuildRequest

Log = logging.Logger | logging.LoggerAdapter


class BuildLog(logging.LoggerAdapter):
    """Prefixes each message with the build's `[e: ...] [build: ...]`."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"{self.extra['prefix']} {msg}", kwargs


def build_log(name: str, request: BuildRequest) -> BuildLog:
    """The logger `name` (a `launcher.*` name) annotated for `request`."""
    prefix = f"[build: {request.uuid}]"
    if request.event_id:
        prefix = f"[e: {request.event_id}] {prefix}"
    return BuildLog(logging.getLogger(name), {"prefix": prefix})
