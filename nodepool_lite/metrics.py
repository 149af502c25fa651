"""Prometheus metrics of the nodepool daemons (prometheus-client).

What ZooKeeper holds (nodes by provider, label and state; node requests by
state; image builds and uploads by state) is read at scrape time by a
collector, so the figures are right after any restart and the same whichever
daemon is asked. What only a daemon sees as it happens (how long each image
build took, and whether it failed) is counted in that daemon.

Each daemon has its own CollectorRegistry, so several can run in one process
(the tests, the quick start) without sharing counters.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter as Tally
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from nodepool_lite.exceptions import NodepoolError
from nodepool_lite.model import BuildState, ImageBuild
from nodepool_lite.zk import ZooKeeper

log = logging.getLogger("nodepool_lite.metrics")

# dib builds take minutes; an hour and more is a build that went wrong.
BUILD_BUCKETS = (30, 60, 120, 180, 300, 600, 900, 1800, 3600, float("inf"))


class StateCollector(Collector):
    """Gauges of what ZooKeeper holds, read when Prometheus scrapes."""

    def __init__(self, zk: ZooKeeper) -> None:
        self.zk = zk

    def collect(self) -> Iterator[GaugeMetricFamily]:
        nodes = GaugeMetricFamily(
            "nodepool_nodes",
            "Nodes by provider, label and state",
            labels=["provider", "label", "state"],
        )
        requests = GaugeMetricFamily(
            "nodepool_node_requests", "Node requests by state", labels=["state"]
        )
        builds = GaugeMetricFamily(
            "nodepool_image_builds", "Image builds by image and state", labels=["image", "state"]
        )
        uploads = GaugeMetricFamily(
            "nodepool_image_uploads",
            "Image uploads by provider and state",
            labels=["provider", "state"],
        )
        try:
            for (provider, label, state), n in Tally(
                (node.provider, node.type, node.state.value) for node in self.zk.nodes()
            ).items():
                nodes.add_metric([provider, label, state], n)
            for state, n in Tally(self._request_states()).items():
                requests.add_metric([state], n)
            build_tally: Tally[tuple[str, str]] = Tally()
            upload_tally: Tally[tuple[str, str]] = Tally()
            for image in self.zk.get_image_names():
                for build in self.zk.get_image_builds(image):
                    build_tally[(image, build.state.value)] += 1
                    for upload in self.zk.get_image_uploads(image, build.id or ""):
                        upload_tally[(upload.provider, upload.state.value)] += 1
            for key, n in build_tally.items():
                builds.add_metric(list(key), n)
            for key, n in upload_tally.items():
                uploads.add_metric(list(key), n)
        except NodepoolError as error:  # ZooKeeper away: a scrape with what we have
            log.warning("Metrics without ZooKeeper's state: %s", error)
        yield from (nodes, requests, builds, uploads)

    def _request_states(self) -> Iterator[str]:
        for request_id in self.zk.node_request_ids():
            req = self.zk.get_node_request(request_id)
            if req is not None:
                yield req.state.value


class BuilderMetrics:
    """What the builder daemon counts as builds finish."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.build_seconds = Histogram(
            "nodepool_image_build_seconds",
            "Duration of image builds by image and result",
            ["image", "result"],
            buckets=BUILD_BUCKETS,
            registry=registry,
        )
        self.build_failures = Counter(
            "nodepool_image_build_failures",
            "Failed image builds by image",
            ["image"],
            registry=registry,
        )

    def finished(self, build: ImageBuild) -> None:
        result = "ready" if build.state == BuildState.READY else "failed"
        self.build_seconds.labels(build.image, result).observe(
            max(0.0, build.state_time - build.created_time)
        )
        if result == "failed":
            self.build_failures.labels(build.image).inc()


class MetricsServer:
    """`/metrics` of one daemon on `listen:port` (prometheus-client's own server)."""

    def __init__(self, registry: CollectorRegistry, listen: str, port: int) -> None:
        self.registry = registry
        self.listen = listen
        self.port = port
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """An address in use is one warning: the daemon matters more than its metrics."""
        try:
            self._server, self._thread = start_http_server(
                self.port, self.listen, registry=self.registry
            )
        except OSError as error:
            log.warning(
                "No metrics: cannot listen on %s:%s (%s)", self.listen, self.port, error.strerror
            )
            return
        self.port = self._server.server_address[1]
        log.info("Metrics on http://%s:%s/metrics", self.listen, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
