"""Prometheus metrics of the scheduler, and the `metrics: {listen, port}`
section that the scheduler and each launcher take in zuul.yaml.

Names follow Prometheus conventions under `zuul_`: counters end in `_total`,
durations are histograms in seconds. Only the scheduler thread updates the
scheduler's. Each daemon has its own CollectorRegistry, served by
nodepool_lite.metrics.MetricsServer (prometheus-client's own HTTP server).
"""

from __future__ import annotations

from dataclasses import dataclass

import voluptuous as v
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from nodepool_lite.metrics import MetricsServer
from zuul_lite.model import Build, BuildState, Pipeline, QueueItem

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

    def server(self, registry: CollectorRegistry) -> MetricsServer:
        return MetricsServer(registry, self.listen, self.port)


class SchedulerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.events = Counter(
            "zuul_events",
            "Trigger events the scheduler handled",
            ["connection", "type"],
            registry=r,
        )
        self.items = Gauge(
            "zuul_pipeline_items", "Items in a pipeline's queues", ["pipeline"], registry=r
        )
        self.builds_waiting = Gauge(
            "zuul_pipeline_builds",
            "Builds of a pipeline's items by state (queued: submitted to gearman, no result yet)",
            ["pipeline", "state"],
            registry=r,
        )
        self.builds = Counter(
            "zuul_builds", "Finished builds by result", ["pipeline", "job", "result"], registry=r
        )
        self.build_duration = Histogram(
            "zuul_build_duration_seconds",
            "How long finished builds ran",
            ["pipeline", "job"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.reported = Counter(
            "zuul_items_reported",
            "Items reported, by the action taken",
            ["pipeline", "action"],
            registry=r,
        )
        self.time_to_vote = Histogram(
            "zuul_time_to_vote_seconds",
            "From an item's enqueue to its report",
            ["pipeline"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )

    def build_finished(self, pipeline: str, build: Build) -> None:
        self.builds.labels(pipeline, build.job, build.result or "").inc()
        if build.elapsed is not None:
            self.build_duration.labels(pipeline, build.job).observe(build.elapsed)

    def item_reported(self, item: QueueItem, action: str, now: float) -> None:
        self.reported.labels(item.pipeline, action).inc()
        self.time_to_vote.labels(item.pipeline).observe(max(0.0, now - item.enqueue_time))

    def pipeline_state(self, pipeline: Pipeline) -> None:
        """Queue lengths and builds by state, after each pass of the loop."""
        items = pipeline.all_items()
        self.items.labels(pipeline.name).set(len(items))
        counts = {state.value: 0 for state in BuildState}
        for item in items:
            for build in item.buildset.builds.values():
                counts[build.state] = counts.get(build.state, 0) + 1
        for state, count in counts.items():
            self.builds_waiting.labels(pipeline.name, state).set(count)
