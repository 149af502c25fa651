"""The `nodepool` CLI against real ZooKeeper (and a real launcher for nodes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from nodepool_lite.cmd.nodepoolcmd import main
from nodepool_lite.launcher import NodePool
from nodepool_lite.model import BuildState, ImageBuild, NodeRequest, NodeState, RequestState
from tests.nodepool_env import IMAGE, LABEL, register_node_image, wait_for, write_config


@pytest.fixture
def conf(tmp_path, zk_hosts):
    return str(write_config(tmp_path, zk_hosts))


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_bad_config_is_one_sentence(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("providers: [{name: p, driver: nspawn, pools: [{name: m, max-servers: x}]}]\n")
    rc, out, err = run(capsys, "-c", str(bad), "list")
    assert rc == 1
    assert err == f"nodepool: {bad}: providers[0].pools[0].max-servers: expected int\n"
    rc, out, err = run(capsys, "-c", str(tmp_path / "missing.yaml"), "list")
    assert rc == 1 and "cannot read" in err and "Traceback" not in err


@pytest.mark.node_image("kernel-ci-debian")
def test_image_commands(conf, zk, capsys):
    rc, out, err = run(capsys, "-c", conf, "image-build", "nope")
    assert rc == 1 and err == "nodepool: Unknown image 'nope': no such entry under diskimages.\n"
    assert run(capsys, "-c", conf, "image-build", IMAGE)[0] == 0
    assert zk.get_image_build_requests() == [IMAGE]
    build = register_node_image(zk)
    rc, out, _ = run(capsys, "-c", conf, "dib-image-list")
    assert rc == 0 and f"{IMAGE}-{build.id}" in out and "ready" in out
    rc, out, _ = run(capsys, "-c", conf, "image-list")
    assert rc == 0 and f"{IMAGE}-{build.id}" in out and LABEL in out
    rc, _, err = run(capsys, "-c", conf, "image-delete", f"{IMAGE}-9999999999")
    assert rc == 1 and "No image build" in err
    rc, out, _ = run(capsys, "-c", conf, "image-delete", f"{IMAGE}-{build.id}")
    assert rc == 0 and zk.get_image_builds(IMAGE) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="nspawn nodes need root")
@pytest.mark.node_image("kernel-ci-debian")
def test_node_commands(conf, zk, capsys):
    register_node_image(zk)
    nodepool = NodePool(conf)
    nodepool.start()
    try:
        req = NodeRequest(node_types=[LABEL], requestor="cli-test")
        zk.submit_node_request(req)
        wait_for(lambda: zk.get_node_request(req.id).state == RequestState.FULFILLED, 60)
        [node_id] = zk.get_node_request(req.id).nodes
        failed = NodeRequest(node_types=["other"], requestor="cli-test")
        zk.submit_node_request(failed)
        wait_for(lambda: zk.get_node_request(failed.id).state == RequestState.FAILED, 30)

        rc, out, _ = run(capsys, "-c", conf, "list")
        assert rc == 0 and node_id in out and "ready" in out and "127.0.0.1:" in out
        rc, out, _ = run(capsys, "-c", conf, "info")
        assert rc == 0 and "no provider offers label other" in out and LABEL in out

        rc, out, _ = run(capsys, "-c", conf, "hold", node_id, "--reason", "debugging")
        assert rc == 0 and zk.get_node(node_id).state == NodeState.HOLD
        assert zk.get_node(node_id).comment == "debugging"
        rc, _, err = run(capsys, "-c", conf, "delete", "0000009999")
        assert rc == 1 and err == "nodepool: No node '0000009999' (see nodepool list).\n"
        rc, out, _ = run(capsys, "-c", conf, "delete", node_id)
        assert rc == 0
        wait_for(lambda: zk.get_node(node_id) is None, 30, "deleted node gone")
        rc, _, err = run(capsys, "-c", conf, "hold", node_id, "--reason", "x")
        assert rc == 1 and "No node" in err
    finally:
        nodepool.stop()
        nodepool.join()


def test_launcher_daemon_reloads_on_sighup_and_keeps_a_good_config(conf, zk):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    daemon = subprocess.Popen(
        [sys.executable, "-m", "nodepool_lite.cmd.nodepoolcmd", "-c", conf, "launcher"], env=env
    )
    try:
        [first] = wait_for(lambda: list(zk.get_launchers()), 30, "launcher registered")
        good = Path(conf).read_text()
        Path(conf).write_text(good.replace("max-servers: 2", "max-servers: two"))
        daemon.send_signal(signal.SIGHUP)
        time.sleep(1)  # a reload would replace the registration within this
        assert list(zk.get_launchers()) == [first] and daemon.poll() is None
        Path(conf).write_text(good.replace("max-servers: 2", "max-servers: 1"))
        daemon.send_signal(signal.SIGHUP)
        wait_for(lambda: list(zk.get_launchers()) not in ([], [first]), 30, "re-registered")
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
        assert zk.get_launchers() == {}
    finally:
        if daemon.poll() is None:
            daemon.kill()


def test_builder_daemon_reloads_on_sighup_and_keeps_a_good_config(conf, zk, tmp_path):
    """Nothing is due (ready builds), so no dib runs; the daemon's log says
    what each SIGHUP did."""
    zk.store_image_build(IMAGE, ImageBuild(state=BuildState.READY))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    log = tmp_path / "builder.log"
    daemon = subprocess.Popen(
        [sys.executable, "-m", "nodepool_lite.cmd.nodepoolcmd", "-c", conf,
         "--log-file", str(log), "builder"], env=env,
    )  # fmt: skip
    try:
        wait_for(lambda: log.exists() and "Builder started" in log.read_text(), 30, "started")
        good = Path(conf).read_text()
        Path(conf).write_text(good.replace("max-servers: 2", "max-servers: two"))
        daemon.send_signal(signal.SIGHUP)
        wait_for(lambda: "Keeping the running config" in log.read_text(), 30, "refused")
        assert "max-servers: expected int" in log.read_text() and daemon.poll() is None
        data = yaml.safe_load(good)
        unknown = {**data, "diskimages": [{**data["diskimages"][0], "elements": ["nope"]}]}
        Path(conf).write_text(yaml.safe_dump(unknown))
        daemon.send_signal(signal.SIGHUP)
        wait_for(lambda: "unknown element 'nope'" in log.read_text(), 30, "refused element")
        assert log.read_text().count("Keeping the running config") == 2
        assert daemon.poll() is None
        data["diskimages"].append({"name": "second", "elements": ["debian-minimal"]})
        Path(conf).write_text(yaml.safe_dump(data))
        zk.store_image_build("second", ImageBuild(state=BuildState.READY))  # not due
        daemon.send_signal(signal.SIGHUP)
        wait_for(lambda: f"reconfigured for images {IMAGE}, second" in log.read_text(), 30,
                 "reconfigured")  # fmt: skip
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
