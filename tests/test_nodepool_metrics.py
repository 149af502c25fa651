"""Prometheus /metrics of the nodepool daemons: what ZooKeeper holds, read at
scrape time, and image build durations counted by the builder; scraped over
HTTP from prometheus-client's own server with a real ZooKeeper."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry

from nodepool_lite import config as npconfig
from nodepool_lite import model as m
from nodepool_lite.exceptions import ConfigError
from nodepool_lite.launcher import NodePool
from nodepool_lite.metrics import BuilderMetrics, MetricsServer, StateCollector


def scrape(server: MetricsServer) -> str:
    return httpx.get(f"http://127.0.0.1:{server.port}/metrics").text


@pytest.fixture
def metrics(zk):
    registry = CollectorRegistry()
    registry.register(StateCollector(zk))
    server = MetricsServer(registry, "127.0.0.1", 0)
    server.start()
    yield registry, server
    server.stop()


def test_nodes_requests_builds_and_uploads_as_zookeeper_holds_them(zk, metrics):
    _, server = metrics
    for state in (m.NodeState.READY, m.NodeState.READY, m.NodeState.IN_USE):
        zk.store_node(m.Node(type="kernel-debian", provider="local", pool="main", state=state))
    zk.submit_node_request(m.NodeRequest(node_types=["kernel-debian"], requestor="test"))
    build = m.ImageBuild(state=m.BuildState.READY, builder="b1", formats=["tar"])
    zk.store_image_build("kernel-ci-debian", build)
    zk.store_image_upload(m.ImageUpload(image="kernel-ci-debian", build_id=build.id,
                                      provider="cloud", state=m.UploadState.READY))  # fmt: skip
    text = scrape(server)
    assert 'nodepool_nodes{label="kernel-debian",provider="local",state="ready"} 2.0' in text
    assert 'nodepool_nodes{label="kernel-debian",provider="local",state="in-use"} 1.0' in text
    assert 'nodepool_node_requests{state="requested"} 1.0' in text
    assert 'nodepool_image_builds{image="kernel-ci-debian",state="ready"} 1.0' in text
    assert 'nodepool_image_uploads{provider="cloud",state="ready"} 1.0' in text


def test_builder_counts_build_durations_and_failures(metrics):
    registry, server = metrics
    counted = BuilderMetrics(registry)
    now = time.time()
    for state, took in ((m.BuildState.READY, 200.0), (m.BuildState.FAILED, 40.0)):
        counted.finished(m.ImageBuild(image="kernel-ci-debian", state=state,
                                    created_time=now - took, state_time=now))  # fmt: skip
    text = scrape(server)
    assert (
        'nodepool_image_build_seconds_count{image="kernel-ci-debian",result="ready"} 1.0' in text
    )
    assert (
        'nodepool_image_build_seconds_sum{image="kernel-ci-debian",result="failed"} 40.0' in text
    )
    assert 'nodepool_image_build_failures_total{image="kernel-ci-debian"} 1.0' in text


def write(tmp_path: Path, zk_hosts: str, metrics: dict) -> Path:
    host, _, rest = zk_hosts.partition(":")
    port, _, chroot = rest.partition("/")
    path = tmp_path / "nodepool.yaml"
    path.write_text(yaml.safe_dump({
        "zookeeper-servers": [{"host": host, "port": int(port), "chroot": "/" + chroot}],
        "state-dir": str(tmp_path / "state"),
        "metrics": metrics,
    }))  # fmt: skip
    return path


def test_launcher_serves_metrics_where_its_config_says(tmp_path, zk_hosts):
    nodepool = NodePool(write(tmp_path, zk_hosts, {"launcher-port": 0}))
    nodepool.start()
    try:
        assert "# TYPE nodepool_nodes gauge" in scrape(nodepool.metrics)
    finally:
        nodepool.stop()
        nodepool.join()


def test_a_bad_metrics_port_names_the_key(tmp_path, zk_hosts):
    with pytest.raises(ConfigError, match=r"metrics\.builder-port: value must be at most 65535"):
        npconfig.load(write(tmp_path, zk_hosts, {"builder-port": 70000}))
