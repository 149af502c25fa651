"""Prometheus `/metrics` for one daemon: its own CollectorRegistry (several
launchers, or a scheduler and a launcher, may share a test process, and the
global registry would mix their figures) served by prometheus-client's own
HTTP server on the `metrics: {listen, port}` of the daemon's config.
The scheduler and the launcher share this helper with nodepool.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from threading import Thread
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

import voluptuous as v
from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client import Counter as Counter_
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from nodepool_lite.exceptions import ZKError

if TYPE_CHECKING:
    from nodepool_lite.zk import ZooKeeper

log = logging.getLogger("nodepool_lite.metrics")

# Port 0 picks a free port (tests); no `metrics:` section serves nothing.
PORT = v.All(int, v.Range(min=0, max=65535))
SCHEMA = {"listen": str, v.Required("port"): PORT}

# Seconds: from a noop job to a defconfig build with boot tests.
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, float("inf"))
# Seconds: an image build takes minutes (186 s warm, MACHINE-NOTES) to an hour.
IMAGE_BUCKETS = (60, 120, 180, 300, 600, 900, 1200, 1800, 3600, 7200, float("inf"))
NODE_LABELS = ["provider", "label", "state"]
IMAGE_LABELS = ["image", "state"]


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
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()  # ends serve_forever in its thread
            server.server_close()


class ZooKeeperCollector(Collector):
    """Nodes by provider, label and state, and image builds by image and
    state, read from ZooKeeper at each scrape: what every launcher and
    builder shares, so the figures hold across restarts. A ZooKeeper that
    does not answer gives `nodepool_zookeeper_up 0` and nothing else."""

    def __init__(self, zk: ZooKeeper, images: list[str], nodes: bool, builds: bool) -> None:
        self.zk = zk
        self.images = images
        self.nodes = nodes
        self.builds = builds

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("nodepool_zookeeper_up", "Whether ZooKeeper answered this scrape")
        try:
            families = list(self._families())
        except ZKError as error:
            log.warning("Metrics scrape without ZooKeeper: %s", error)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self) -> Iterator[GaugeMetricFamily]:
        if self.nodes:
            family = GaugeMetricFamily(
                "nodepool_nodes", "Nodes by provider, label and state", labels=NODE_LABELS
            )
            counts = Counter((n.provider, n.type, n.state.value) for n in self.zk.nodes())
            for key, count in sorted(counts.items()):
                family.add_metric(list(key), count)
            yield family
        if self.builds:
            family = GaugeMetricFamily(
                "nodepool_image_builds",
                "Image builds kept, by image and state",
                labels=IMAGE_LABELS,
            )
            for image in self.images:
                states = Counter(b.state.value for b in self.zk.get_image_builds(image))
                for state, count in sorted(states.items()):
                    family.add_metric([image, state], count)
            yield family


class BuilderMetrics:
    """The builder's registry: image builds from ZooKeeper, plus how long
    each build of this builder took and how it ended."""

    def __init__(self, zk: ZooKeeper, images: list[str]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(ZooKeeperCollector(zk, images, nodes=False, builds=True))
        self.duration = Histogram(
            "nodepool_image_build_duration_seconds",
            "How long diskimage-builder and the extraction took, by image and result",
            ["image", "result"],
            buckets=IMAGE_BUCKETS,
            registry=self.registry,
        )
        self.results = Counter_(
            "nodepool_image_builds_finished",
            "Image builds this builder finished, by image and result (failed: a failure)",
            ["image", "result"],
            registry=self.registry,
        )

    def build_finished(self, image: str, result: str, seconds: float) -> None:
        self.duration.labels(image, result).observe(seconds)
        self.results.labels(image, result).inc()


def launcher_registry(zk: ZooKeeper) -> CollectorRegistry:
    """The nodepool launcher's registry: nodes from ZooKeeper."""
    registry = CollectorRegistry()
    registry.register(ZooKeeperCollector(zk, [], nodes=True, builds=False))
    return registry
