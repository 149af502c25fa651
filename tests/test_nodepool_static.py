"""The static driver: hosts are lent to one request at a time, then returned."""

from __future__ import annotations

import threading
from pathlib import Path

import yaml

from nodepool_lite.launcher import NodePool
from nodepool_lite.model import NodeRequest, NodeState, RequestState
from tests.nodepool_env import wait_for

FIXTURE = Path(__file__).parent / "fixtures" / "nodepool-static.yaml"


def test_static_host_lent_out_once_at_a_time(tmp_path, zk, zk_hosts):
    data = yaml.safe_load(FIXTURE.read_text())
    hosts, _, chroot = zk_hosts.partition("/")
    host, port = hosts.split(":")
    data["zookeeper-servers"] = [{"host": host, "port": int(port), "chroot": chroot}]
    data["state-dir"] = str(tmp_path / "state")
    path = tmp_path / "nodepool.yaml"
    path.write_text(yaml.safe_dump(data))
    nodepool = NodePool(path)
    nodepool.start()
    try:
        fulfilled = threading.Event()
        first = NodeRequest(node_types=["static-label"], requestor="t")
        zk.submit_node_request(
            first, lambda r: fulfilled.set() if r and r.state == RequestState.FULFILLED else None
        )
        assert fulfilled.wait(30)
        second = NodeRequest(node_types=["static-label"], requestor="t")
        zk.submit_node_request(second)
        node = zk.get_node(zk.get_node_request(first.id).nodes[0])
        assert (node.interface_ip, node.connection_port) == ("127.0.0.1", 2222)
        assert node.host_keys[0].startswith("ssh-ed25519 ")
        zk.lock_node(node)
        node.state = NodeState.IN_USE
        zk.store_node(node)
        zk.delete_node_request(first)
        assert zk.get_node_request(second.id).state == RequestState.REQUESTED
        node.state = NodeState.USED
        zk.store_node(node)
        zk.unlock_node(node)
        wait_for(
            lambda: zk.get_node_request(second.id).state == RequestState.FULFILLED,
            30, "second request served by the returned host",
        )  # fmt: skip
        assert zk.get_node(node.id) is None
    finally:
        nodepool.stop()
        nodepool.join()
