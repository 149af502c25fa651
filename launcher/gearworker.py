"""gear Worker with TCP_NODELAY on its sockets.

gear 0.16 never sets TCP_NODELAY, so a small WORK_COMPLETE waits on Nagle and
the peer's delayed ACK: a submit→complete round trip costs ~45 ms on loopback
instead of <1 ms (see bench/gear_roundtrip.py). gear calls
`_onActiveConnection` after every (re-)connect, which is the one place that
sees each new socket, so we set the option there instead of patching `socket`.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import gear

log = logging.getLogger("launcher.gearworker")


def set_nodelay(conn: Any) -> None:
    """Turn Nagle off on a gear connection's socket (if it has one yet)."""
    sock = getattr(conn, "conn", None)
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        log.debug("Could not set TCP_NODELAY on %s", conn)


class NoDelayWorker(gear.Worker):
    """A gear.Worker whose connections all carry TCP_NODELAY."""

    def _onActiveConnection(self, conn: Any) -> None:  # noqa: N802 (gear's hook name)
        set_nodelay(conn)
        super()._onActiveConnection(conn)


class NoDelayClient(gear.Client):
    """A gear.Client with TCP_NODELAY; the benchmark and tests submit through it."""

    def _onActiveConnection(self, conn: Any) -> None:  # noqa: N802
        set_nodelay(conn)
        super()._onActiveConnection(conn)
