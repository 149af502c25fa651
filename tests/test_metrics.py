"""Prometheus /metrics of the scheduler and of launchers, scraped over HTTP
from prometheus-client's own server on loopback."""

from __future__ import annotations

import dataclasses

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from launcher.config import LauncherConfig
from launcher.server import LauncherServer
from nodepool_lite.metrics import MetricsConfig, MetricsServer
from tests.harness import noop_check_run
from zuul_lite.metrics import SchedulerMetrics


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one /metrics page."""
    text = httpx.get(url).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_scheduler_metrics_after_a_check_run(tmp_path, zk_hosts):
    metrics = {"listen": "127.0.0.1", "port": 0}
    with noop_check_run(tmp_path, zk_hosts, metrics=metrics) as (_, sched, _):
        found = scrape(sched.metrics_server.url)
    event = (("connection", "local"), ("type", "patchset-created"))
    assert found[("zuul_events_total", event)] == 1
    noop = (("job", "noop"), ("pipeline", "check"), ("result", "SUCCESS"))
    assert found[("zuul_builds_total", noop)] == 1
    duration = (("job", "noop"), ("pipeline", "check"))
    assert found[("zuul_build_duration_seconds_count", duration)] == 1
    reported = (("action", "success"), ("pipeline", "check"))
    assert found[("zuul_items_reported_total", reported)] == 1
    assert found[("zuul_time_to_vote_seconds_count", (("pipeline", "check"),))] == 1
    assert found[("zuul_pipeline_items", (("pipeline", "check"),))] == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(sched.metrics_server.url)


def test_launchers_in_one_process_each_serve_their_own(tmp_path, zk, gear_server):
    base = LauncherConfig(
        zk_hosts="unused",
        gearman_server="127.0.0.1",
        gearman_port=gear_server.port,
        work_root=tmp_path / "work",
        log_root=tmp_path / "logs",
        log_url="http://logs/",
        jobs_dir=tmp_path / "jobs",
        private_key=tmp_path / "key",
        metrics=MetricsConfig("127.0.0.1", 0),
    )
    one = LauncherServer(dataclasses.replace(base, name="one"), zk)
    two = LauncherServer(dataclasses.replace(base, name="two"), zk)
    for server in (one, two):
        server.start()
    try:
        one.metrics.build_finished("kernel-build", "FAILURE", 42.0)
        first, second = scrape(one.metrics_server.url), scrape(two.metrics_server.url)
    finally:
        for server in (one, two):
            server.stop()
            server.join(10)
    assert one.metrics_server.port != two.metrics_server.port
    build = (("job", "kernel-build"), ("result", "FAILURE"))
    assert first[("zuul_launcher_builds_total", build)] == 1
    assert ("zuul_launcher_builds_total", build) not in second
    assert first[("zuul_launcher_builds_running", ())] == 0
    assert first[("zuul_launcher_build_duration_seconds_sum", (("job", "kernel-build"),))] == 42


def test_a_taken_port_is_one_sentence():
    first = MetricsServer(SchedulerMetrics().registry, MetricsConfig("127.0.0.1", 0), "scheduler")
    first.start()
    try:
        taken = MetricsConfig("127.0.0.1", first.port)
        with pytest.raises(OSError, match=r"^Cannot serve the scheduler metrics on 127\.0\.0\.1"):
            MetricsServer(SchedulerMetrics().registry, taken, "scheduler").start()
    finally:
        first.stop()
