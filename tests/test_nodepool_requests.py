"""Request handling of the launcher over static hosts (no boot, so each test
takes a second or two): failover to another provider, every reason when all
decline, min-ready spares handed out at once and replaced, `request-list`,
and a launcher killed with -9 mid-launch."""

from __future__ import annotations

import os
import signal
import socket

import pytest

from nodepool_lite.cmd.nodepoolcmd import main
from nodepool_lite.launcher import NodePool
from nodepool_lite.min_ready import PRIORITY, REQUESTOR, is_spare, release_nodes
from nodepool_lite.model import NodeRequest, NodeState, RequestState
from nodepool_lite.zk_nodepool import REQUEST_LOCK_ROOT
from tests.nodepool_env import (
    STATIC_LABEL,
    STATIC_OTHER,
    launchers,
    nodepool_process,
    release,
    request,
    static_config,
    static_host,
    take_nodes,
    wait_for,
)

LABEL = STATIC_LABEL
OTHER = STATIC_OTHER


def closed_port() -> int:
    """A loopback port nothing listens on: a static host there fails to launch."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def nodepool(tmp_path, zk_hosts):
    with launchers() as start:
        yield lambda providers, **top: start(static_config(tmp_path, zk_hosts, providers, **top))


def test_failed_launches_fail_over_to_another_provider(nodepool, zk):
    broken = static_host("127.0.0.1", closed_port(), [LABEL], key=False)
    good = static_host("127.0.0.2", 2222, [LABEL, OTHER])
    nodepool({"broken": [broken], "good": [good]})
    # The good host is lent out: only the broken provider can try `first`.
    busy, busy_done, _ = request(zk, OTHER)
    assert busy_done.wait(30)
    lent = take_nodes(zk, busy)
    first, done, _ = request(zk, LABEL)
    wait_for(lambda: "broken/main" in zk.get_node_request(first.id).declined_reasons, 30,
             "the broken provider's decline")  # fmt: skip
    fresh = zk.get_node_request(first.id)
    assert fresh.state == RequestState.REQUESTED and not done.is_set()
    assert "Connection refused" in fresh.declined_reasons["broken/main"]
    release(zk, lent)
    assert done.wait(30)
    [node] = take_nodes(zk, first)
    assert (node.provider, node.interface_ip) == ("good", "127.0.0.2")
    release(zk, [node])
    wait_for(lambda: not zk.nodes(), 30, "used node deleted")


def test_request_fails_with_every_pool_reason_once_all_decline(nodepool, zk, capsys):
    np = nodepool(
        {
            "a": [static_host("127.0.0.1", closed_port(), [LABEL], key=False)],
            "b": [static_host("127.0.0.1", closed_port(), [LABEL], key=False)],
        }
    )
    req, done, _ = request(zk, LABEL)
    assert done.wait(30)
    fresh = zk.get_node_request(req.id)
    assert fresh.state == RequestState.FAILED
    assert fresh.reason.startswith("every provider pool declined: a/main: node ")
    assert "; b/main: node " in fresh.reason and "Connection refused" in fresh.reason
    wait_for(lambda: not zk.nodes(), 30, "failed nodes deleted")
    unknown, done, _ = request(zk, "nope")
    assert done.wait(10)
    assert zk.get_node_request(unknown.id).reason == "no provider offers label nope"
    assert main(["-c", str(np.config.path), "request-list"]) == 0
    out = capsys.readouterr().out
    rows = [line.split(None, 6) for line in out.splitlines()[1:]]
    assert [r[0] for r in rows] == [req.id, unknown.id]
    assert rows[0][1] == "failed" and rows[0][5] == "a/main,b/main"


def spares(zk, label: str = LABEL) -> list:
    return [n for n in zk.nodes() if n.type == label and is_spare(n)]


def test_min_ready_spare_handed_out_at_once_and_replaced(nodepool, zk, capsys):
    hosts = [static_host(f"127.0.0.{i}", 2222, [LABEL]) for i in (1, 2, 3)]
    np = nodepool({"static": hosts}, labels=[{"name": LABEL, "min-ready": 1}])
    [spare] = wait_for(lambda: spares(zk), 30, "a ready node")
    wait_for(lambda: not zk.node_request_ids(), 10, "the min-ready request deleted")
    req, done, _ = request(zk, LABEL)
    assert done.wait(10)
    assert zk.get_node_request(req.id).nodes == [spare.id]
    [node] = take_nodes(zk, req)
    [replacement] = wait_for(lambda: spares(zk), 30, "a replacement")
    assert replacement.id != spare.id and replacement.external_id != node.external_id
    assert main(["-c", str(np.config.path), "list"]) == 0
    listed = capsys.readouterr().out
    assert f"{replacement.id}  {LABEL}" in listed and "ready" in listed and "in-use" in listed
    release(zk, [node])
    # Marked used while still locked: the release of its lock wakes the
    # cleanup (a watch), well before the 30 s safety tick.
    wait_for(lambda: zk.get_node(node.id) is None, 10, "used node deleted")
    # Used once, then deleted; min-ready keeps one spare, not one per freed host.
    assert [n.id for n in zk.nodes()] == [replacement.id]
    assert not any(
        (r := zk.get_node_request(i)) and r.requestor == REQUESTOR for i in zk.node_request_ids()
    )


def test_a_min_ready_request_goes_before_its_lock(zk):
    """Once its spares are ready, the min-ready request is deleted while still
    locked: a pool worker that saw it `pending` and found it unlocked would
    take it for one whose launcher died and requeue it (the bench saw that
    race as failed passes)."""
    req = NodeRequest(node_types=[LABEL], requestor=REQUESTOR)
    zk.submit_node_request(req, priority=PRIORITY)
    zk.lock_node_request(req)
    req.state = RequestState.PENDING
    zk.store_node_request(req)
    at_release = []
    release_lock = req.lock.release

    def release_watched() -> None:
        at_release.append(zk.get_node_request(req.id))
        release_lock()

    req.lock.release = release_watched
    release_nodes(zk, req, [])
    assert at_release == [None]
    assert not zk.exists(f"{REQUEST_LOCK_ROOT}/{req.id}")


def test_min_ready_of_a_label_no_pool_offers_is_one_sentence(tmp_path, zk_hosts, capsys):
    path = static_config(
        tmp_path, zk_hosts, {"s": [static_host("127.0.0.1", 2222, [LABEL])]},
        labels=[{"name": LABEL}, {"name": OTHER, "min-ready": 2}],
    )  # fmt: skip
    assert main(["-c", str(path), "list"]) == 1
    assert capsys.readouterr().err == (
        f"nodepool: {path}: labels[1].min-ready: no provider pool offers label 'other-label'\n"
    )


def test_kill_9_launcher_mid_launch_then_restart(tmp_path, zk, zk_hosts):
    """Killed while a static host's key scan hangs: after the restart the
    half-launched node is deleted, its request served again, nothing stays."""
    silent = socket.socket()  # accepts, never says an ssh banner
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    port = silent.getsockname()[1]
    conf = static_config(
        tmp_path, zk_hosts, {"s": [static_host("127.0.0.1", port, [LABEL], key=False)]}
    )
    daemon = nodepool_process(conf)
    nodepool = None
    try:
        req, done, _ = request(zk, LABEL)
        [half] = wait_for(lambda: zk.nodes(), 30, "the launch to start")
        assert half.state == NodeState.BUILDING
        os.killpg(daemon.pid, signal.SIGKILL)
        daemon.wait()
        # The operator fixes the host (its key is now known) and restarts.
        static_config(tmp_path, zk_hosts, {"s": [static_host("127.0.0.1", port, [LABEL])]})
        nodepool = NodePool(conf)
        nodepool.start()
        assert done.wait(60)  # the dead launcher's session expires first
        [node] = take_nodes(zk, req)
        assert node.id != half.id and zk.get_node(half.id) is None
        release(zk, [node])
        wait_for(lambda: not zk.nodes(), 30, "used node deleted")
        wait_for(lambda: not zk.request_lock_ids(), 30, "request locks removed")
        assert list(zk.get_launchers()) == [w.launcher_id for w in nodepool.pool_workers]
    finally:
        silent.close()
        if daemon.poll() is None:
            daemon.kill()
        if nodepool is not None:
            nodepool.stop()
            nodepool.join()
