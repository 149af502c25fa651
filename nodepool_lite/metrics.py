"""Prometheus `/metrics` for one daemon: its own CollectorRegistry (several
launchers, or a scheduler and a launcher, may share a test process, and the
global registry would mix their figures) served by prometheus-client's own
HTTP server on the `metrics: {listen, port}` of the daemon's config.
The scheduler and the launcher share this helper with nodepool.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from threading import Thread
from wsgiref.simple_server import WSGIServer

import voluptuous as v
from prometheus_client import CollectorRegistry, start_http_server

log = logging.getLogger("nodepool_lite.metrics")

# Port 0 picks a free port (tests); no `metrics:` section serves nothing.
SCHEMA = {"listen": str, v.Required("port"): v.All(int, v.Range(min=0, max=65535))}

# Seconds: from a noop job to a defconfig build with boot tests.
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, float("inf"))


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    listen: str = "127.0.0.1"
    port: int = 0

    @classmethod
    def from_config(cls, section: dict | None) -> MetricsConfig | None:
        if not section:
            return None
        return cls(section.get("listen", "127.0.0.1"), section["port"])


class MetricsServer:
    """Serve `registry` on `listen:port` in a thread; `port` is the bound one after start()."""

    def __init__(self, registry: CollectorRegistry, config: MetricsConfig, name: str) -> None:
        self.registry = registry
        self.listen = config.listen
        self.port = config.port
        self.name = name
        self._server: WSGIServer | None = None
        self._thread: Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.listen}]" if ":" in self.listen else self.listen
        return f"http://{host}:{self.port}/metrics"

    def start(self) -> None:
        """Raises OSError with one sentence when the port is taken."""
        try:
            self._server, self._thread = start_http_server(
                self.port, addr=self.listen, registry=self.registry
            )
        except OSError as error:
            raise OSError(
                f"Cannot serve the {self.name} metrics on {self.listen}:{self.port}: "
                f"{error.strerror}."
            ) from error
        self.port = self._server.server_port
        log.info("Metrics of the %s at %s", self.name, self.url)

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server = None
