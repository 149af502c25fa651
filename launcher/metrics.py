"""A launcher's Prometheus metrics (its own registry, served by
nodepool_lite.metrics): builds running now, finished builds by job and
result, and how long they ran."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from zuul_lite.metrics import DURATION_BUCKETS


class LauncherMetrics:
    def __init__(self, running: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("zuul_launcher_builds_running", "Builds running now", registry=r)
        self.running.set_function(running)
        self.builds = Counter(
            "zuul_launcher_builds", "Finished builds by result", ["job", "result"], registry=r
        )
        self.duration = Histogram(
            "zuul_launcher_build_duration_seconds",
            "How long finished builds ran, from taking the job to the result",
            ["job"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )

    def build_finished(self, job: str, result: str, elapsed: float | None) -> None:
        self.builds.labels(job, result).inc()
        if elapsed is not None:
            self.duration.labels(job).observe(elapsed)
