"""Prometheus /metrics of the scheduler and of launchers, scraped over HTTP
from prometheus-client's own server on loopback (nodepool's: tests/test_nodepool_metrics.py)."""

from __future__ import annotations

import dataclasses

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from launcher import config as launcher_config
from launcher.config import LauncherConfig
from launcher.server import LauncherServer
from tests.harness import REPO_ROOT as REPO
from tests.harness import noop_check_run
from zuul_lite import config as zconfig
from zuul_lite.metrics import MetricsConfig


def url(server) -> str:
    return f"http://127.0.0.1:{server.port}/metrics"


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one /metrics page."""
    response = httpx.get(url)
    response.raise_for_status()
    text = response.text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_scheduler_metrics_after_a_check_run(tmp_path, zk_hosts):
    metrics = {"listen": "127.0.0.1", "port": 0}
    with noop_check_run(tmp_path, zk_hosts, metrics=metrics) as (_, sched, _):
        found = scrape(url(sched.metrics_server))
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
        httpx.get(url(sched.metrics_server))


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
        first, second = scrape(url(one.metrics_server)), scrape(url(two.metrics_server))
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


def test_example_configs_serve_metrics_on_loopback():
    assert zconfig.load(REPO / "etc" / "zuul.yaml").metrics == MetricsConfig("127.0.0.1", 9102)
    assert launcher_config.load(REPO / "etc" / "zuul.yaml").metrics == MetricsConfig(
        "127.0.0.1", 9103
    )
