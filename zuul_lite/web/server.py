"""Serve the web app with uvicorn in a thread of the calling process.

`zuul-lite web` and the all-in-one quick start both embed the server next to
other threads, so it must start and stop on request instead of owning the
main thread and its signals (uvicorn skips signal handlers outside it).
"""

from __future__ import annotations

import logging
import socket
import threading

import uvicorn
from fastapi import FastAPI

log = logging.getLogger("zuul_lite.web")

START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


class _Server(uvicorn.Server):
    """uvicorn.Server that tells the starting thread when it accepts connections."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()


class WebServer:
    """The web app on `host:port`; port 0 picks a free port, read back from `port`."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 9000) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        """Bind, then serve in a thread; returns once requests are answered.

        Binding here rather than in uvicorn's thread turns "port in use" into
        an OSError for the caller instead of a log line from a dying thread.
        """
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise OSError(f"Cannot listen on {self.host}:{self.port}: {exc.strerror}.") from exc
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app, log_config=None, lifespan="off", timeout_graceful_shutdown=STOP_TIMEOUT
        )
        self._server = _Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="zuul-lite-web", daemon=True
        )
        self._thread.start()
        if not self._server.ready.wait(START_TIMEOUT):
            self.stop()
            raise RuntimeError(f"The web server did not start within {START_TIMEOUT:.0f}s.")
        log.info("Web server listening on %s", self.url)

    def stop(self) -> None:
        """Ask uvicorn to finish open requests and exit, then wait for its thread."""
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(STOP_TIMEOUT + 5)
        if self._thread.is_alive():
            log.warning("Web server thread did not stop within %ss", STOP_TIMEOUT + 5)
        else:
            log.info("Web server on %s stopped", self.url)
        self._server = self._thread = None
