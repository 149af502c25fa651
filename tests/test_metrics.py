"""Prometheus /metrics of the scheduler and of launchers, scraped over HTTP
from prometheus-client's own server on loopback."""

from __future__ import annotations

import dataclasses

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from launcher import config as launcher_config
from launcher.config import LauncherConfig
from launcher.server import LauncherServer
from nodepool_lite import config as npconfig
from nodepool_lite.metrics import BuilderMetrics, MetricsConfig, MetricsServer, launcher_registry
from nodepool_lite.model import BuildState, ImageBuild, Node, NodeState
from nodepool_lite.zk import ZooKeeper
from tests.harness import REPO_ROOT as REPO
from tests.harness import noop_check_run
from zuul_lite import config as zconfig
from zuul_lite.metrics import SchedulerMetrics


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


def test_nodepool_metrics_read_zookeeper(zk, zk_hosts):
    for state, provider in (("ready", "local"), ("ready", "local"), ("in-use", "cloud")):
        zk.store_node(Node(state=NodeState(state), type="kernel-debian", provider=provider))
    zk.store_image_build("kernel-ci-debian", ImageBuild(state=BuildState.READY))
    zk.store_image_build("kernel-ci-debian", ImageBuild(state=BuildState.FAILED))
    builder = BuilderMetrics(zk, ["kernel-ci-debian"])
    builder.build_finished("kernel-ci-debian", "failed", 250.0)
    away = ZooKeeper(zk_hosts)
    servers = [
        MetricsServer(launcher_registry(zk), MetricsConfig(), "launcher"),
        MetricsServer(builder.registry, MetricsConfig(), "builder"),
        MetricsServer(launcher_registry(away), MetricsConfig(), "launcher"),
    ]
    for server in servers:
        server.start()
    try:
        nodes, images, down = (scrape(server.url) for server in servers)
    finally:
        for server in servers:
            server.stop()
    ready = (("label", "kernel-debian"), ("provider", "local"), ("state", "ready"))
    assert nodes[("nodepool_nodes", ready)] == 2
    in_use = (("label", "kernel-debian"), ("provider", "cloud"), ("state", "in-use"))
    assert nodes[("nodepool_nodes", in_use)] == 1
    assert nodes[("nodepool_zookeeper_up", ())] == 1
    failed = (("image", "kernel-ci-debian"), ("state", "failed"))
    assert images[("nodepool_image_builds", failed)] == 1
    result = (("image", "kernel-ci-debian"), ("result", "failed"))
    assert images[("nodepool_image_builds_finished_total", result)] == 1
    assert images[("nodepool_image_build_duration_seconds_sum", result)] == 250
    assert down == {("nodepool_zookeeper_up", ()): 0}


def test_example_configs_serve_metrics_on_loopback():
    nodepool = npconfig.load(REPO / "etc" / "nodepool.yaml")
    assert nodepool.launcher_metrics == MetricsConfig("127.0.0.1", 9104)
    assert nodepool.builder_metrics == MetricsConfig("127.0.0.1", 9105)
    assert zconfig.load(REPO / "etc" / "zuul.yaml").metrics == MetricsConfig("127.0.0.1", 9102)
    assert launcher_config.load(REPO / "etc" / "zuul.yaml").metrics == MetricsConfig(
        "127.0.0.1", 9103
    )
