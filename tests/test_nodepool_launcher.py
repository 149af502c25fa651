"""The nodepool launcher with real ZooKeeper, real nspawn nodes and real ssh."""

from __future__ import annotations

import base64
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import paramiko
import pytest

from nodepool_lite import exceptions as exc
from nodepool_lite.drivers.netns import forward_pids
from nodepool_lite.drivers.nspawn.limits import NodeCgroup
from nodepool_lite.drivers.nspawn.provider import container_pids
from nodepool_lite.drivers.userns import NODE_UID_BASE, NODE_UID_COUNT
from nodepool_lite.launcher import NodePool
from nodepool_lite.model import (
    BuildState,
    ImageBuild,
    Node,
    NodeState,
    RequestState,
)
from nodepool_lite.zk_nodepool import NODE_ROOT
from tests.nodepool_env import (
    IMAGE,
    LABEL,
    TRUSTED_LABEL,
    nodepool_process,
    register_node_image,
    release,
    request,
    take_nodes,
    wait_for,
    write_config,
)

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="nspawn nodes need root"),
    pytest.mark.node_image("kernel-ci-debian"),
]


@pytest.fixture
def nodepool_factory(tmp_path, zk, zk_hosts):
    """Start NodePools on one config; stops whatever is still running at the end."""
    register_node_image(zk)
    started: list[NodePool] = []

    def make(max_servers: int = 2, **kwargs) -> NodePool:
        path = write_config(tmp_path, zk_hosts, max_servers=max_servers, **kwargs)
        pool = NodePool(path)
        pool.start()
        started.append(pool)
        return pool

    yield make
    for pool in started:
        if not pool.stop_event.is_set():
            pool.stop()
            pool.join()
    # Nothing may outlive a test: destroy nodes the test left behind.
    if started:
        provider = started[-1].providers.get("local")
        final = NodePool(started[-1].config.path)
        final.start()
        for node in zk.nodes():
            if node.state in (NodeState.READY, NodeState.IN_USE, NodeState.HOLD):
                try:
                    zk.lock_node(node, blocking=False)
                except exc.LockError:
                    # A failed test's own lock (this session): release it.
                    zk.delete(f"{NODE_ROOT}/{node.id}/lock", recursive=True)
                node.state = NodeState.USED
                zk.store_node(node)
                if node.lock is not None:
                    zk.unlock_node(node)
        wait_for(lambda: not zk.nodes(), 60, "all nodes destroyed")
        wait_for(lambda: not provider.leaked_node_ids(), 30, "node dirs removed")
        final.stop()
        final.join()


def ssh_run(node: Node, key_path: Path, command: str) -> str:
    client = paramiko.SSHClient()
    kind, blob = node.host_keys[0].split()[:2]
    client.get_host_keys().add(
        f"[{node.interface_ip}]:{node.connection_port}",
        kind,
        paramiko.Ed25519Key(data=base64.b64decode(blob)),
    )
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(
        node.interface_ip, port=node.connection_port, username=node.username,
        key_filename=str(key_path), allow_agent=False, look_for_keys=False, timeout=10,
    )  # fmt: skip
    try:
        _, stdout, stderr = client.exec_command(command, timeout=30)
        status = stdout.channel.recv_exit_status()
        out = stdout.read().decode()
        assert status == 0, (status, out, stderr.read().decode())
        return out
    finally:
        client.close()


def node_gone(zk, nodepool: NodePool, node: Node) -> bool:
    root = nodepool.config.state_dir / "nodes" / node.id
    return zk.get_node(node.id) is None and not root.exists()


# Run on a node: what of the host it can reach (nothing but its own loopback).
PROBE = """
import socket, sys
print(",".join(name for _, name in socket.if_nameindex()))
for host, port in [(h, int(p)) for h, p in (a.rsplit(":", 1) for a in sys.argv[1:])]:
    try:
        socket.create_connection((host, port), 2).close()
        print(f"reached {host}:{port}")
    except OSError as error:
        print(f"unreachable {host}:{port}")
"""


# Run on a node: how many of 100 sleeping children it may start.
SPAWN = """
import subprocess
started, refused = [], 0
for _ in range(100):
    try:
        started.append(subprocess.Popen(["sleep", "30"]))
    except OSError:
        refused += 1
for proc in started:
    proc.kill()
print(len(started), refused)
"""


def host_addresses() -> list[str]:
    """The host's own IPv4 addresses other than loopback."""
    out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    return [f.split("/")[0] for line in out.splitlines() for f in line.split()[3:4]
            if not f.startswith("127.")]  # fmt: skip


def test_request_fulfilled_ssh_and_destroyed(nodepool_factory, zk, zk_hosts):
    nodepool = nodepool_factory()
    start = time.monotonic()
    req, done, _ = request(zk, LABEL)
    assert done.wait(60), zk.get_node_request(req.id)
    boot = time.monotonic() - start
    [node] = take_nodes(zk, req)
    assert node.type == LABEL and node.provider == "local" and node.pool == "main"
    assert node.interface_ip == "127.0.0.1" and node.username == "zuul"
    assert node.external_id == f"np-{node.id}" and node.image_build
    root = nodepool.config.state_dir / "nodes" / node.id / "root"
    pids = container_pids(root)
    assert pids
    key = nodepool.config.state_dir / "keys" / "id_ed25519"
    out = ssh_run(
        node, key, "id -un; sudo -n id -u; hostname; test -d /var/cache/ccache && echo ok"
    )
    assert out.split() == ["zuul", "0", f"np-{node.id}", "ok"]
    # Root in the node is an unprivileged uid of the host (its own user namespace).
    assert ssh_run(node, key, "cat /proc/self/uid_map").split() == [
        "0", str(NODE_UID_BASE), str(NODE_UID_COUNT)
    ]  # fmt: skip
    for pid in container_pids(root):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            continue  # ended meanwhile (an ssh session's process)
        uids = status.split("\nUid:")[1].split()[:4]
        assert all(int(uid) >= NODE_UID_BASE for uid in uids), (pid, uids)
    # Its own network namespace: ZooKeeper on the host's loopback, the host's
    # sshd-less addresses and the node's own forwarded port are all out of reach.
    zk_port = zk_hosts.split("/")[0].rsplit(":", 1)[1]
    targets = [f"127.0.0.1:{zk_port}", f"127.0.0.1:{node.connection_port}"]
    targets += [f"{a}:{zk_port}" for a in host_addresses()]
    probe = ssh_run(node, key, f"python3 -c {shlex.quote(PROBE)} {' '.join(targets)}")
    lines = probe.split("\n")
    assert lines[0] == "lo", probe
    assert all(line.startswith("unreachable") for line in lines[1:] if line), probe

    start = time.monotonic()
    release(zk, [node])
    wait_for(lambda: node_gone(zk, nodepool, node), 30, "node destroyed")
    destroy = time.monotonic() - start
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
    print(f"\nnode boot (request -> fulfilled) {boot:.2f}s, destroy (used -> gone) {destroy:.2f}s")


CACHE_WRITE = """
for how in "touch /var/cache/ccache/planted" \
           "sudo -n touch /var/cache/ccache/planted" \
           "sudo -n mount -o remount,bind,rw /var/cache/ccache" \
           "sudo -n mount -o remount,rw /var/cache/ccache"; do
  if $how 2>/dev/null; then echo "wrote: $how"; else echo "refused: $how"; fi
done
"""


def test_only_the_trusted_label_writes_the_shared_compiler_cache(nodepool_factory, zk):
    """A patch's build reads the shared cache but cannot plant objects in it, even
    as root in its node; a node of the trusted label (post builds) fills it."""
    nodepool = nodepool_factory()
    req, done, _ = request(zk, LABEL, TRUSTED_LABEL)
    assert done.wait(60), zk.get_node_request(req.id)
    untrusted, trusted = take_nodes(zk, req)
    assert (untrusted.type, trusted.type) == (LABEL, TRUSTED_LABEL)
    key = nodepool.config.state_dir / "keys" / "id_ed25519"
    shared = nodepool.config.path.parent / "ccache"
    ssh_run(trusted, key, "echo object > /var/cache/ccache/entry")
    assert (shared / "entry").read_text() == "object\n"
    assert ssh_run(untrusted, key, "cat /var/cache/ccache/entry") == "object\n"
    out = ssh_run(untrusted, key, CACHE_WRITE)
    assert "wrote" not in out and out.count("refused") == 4, out
    assert not (shared / "planted").exists()
    release(zk, [untrusted, trusted])
    wait_for(lambda: not zk.nodes(), 30, "nodes destroyed")


def test_node_limits_fail_the_build_not_the_host(nodepool_factory, zk):
    """Memory, tasks, CPU and disk per label: a runaway job hits its node's limits."""
    nodepool = nodepool_factory(limits={"memory": 200, "tasks": 64, "cpus": 0.5, "disk": 128})
    req, done, _ = request(zk, LABEL)
    assert done.wait(60), zk.get_node_request(req.id)
    [node] = take_nodes(zk, req)
    root = nodepool.config.state_dir / "nodes" / node.id / "root"
    cgroup = NodeCgroup(root.parent)
    assert cgroup.read("memory", "memory.limit_in_bytes") == str(200 * 1024 * 1024)
    assert cgroup.read("pids", "pids.max") == "64"
    assert cgroup.read("cpu", "cpu.cfs_quota_us") == "50000"
    assert set(container_pids(root)) <= {
        int(pid) for pid in cgroup.read("memory", "cgroup.procs").split()
    }
    key = nodepool.config.state_dir / "keys" / "id_ed25519"
    # Disk: writing past 128 MiB fails inside the node; the host is untouched.
    out = ssh_run(node, key, "dd if=/dev/zero of=~/fill bs=1M count=300 2>&1 || echo FULL")
    assert "No space left on device" in out and "FULL" in out, out
    ssh_run(node, key, "rm ~/fill")
    # Memory: a process that wants 400 MiB is killed in the node's cgroup.
    out = ssh_run(
        node, key, "python3 -c 'b = bytearray(400 << 20); print(len(b))' 2>&1; echo rc=$?"
    )
    assert "rc=137" in out, out
    # Tasks: far fewer than a fork bomb.
    out = ssh_run(node, key, f"python3 -c {shlex.quote(SPAWN)}")
    started, refused = map(int, out.split())
    assert started < 64 and refused > 0, out
    release(zk, [node])
    wait_for(lambda: node_gone(zk, nodepool, node), 30, "node destroyed")
    assert not any(path.exists() for path in cgroup.dirs.values())


def test_max_servers_queues_requests(nodepool_factory, zk):
    nodepool_factory(max_servers=1)
    first, first_done, _ = request(zk, LABEL)
    second, second_done, _ = request(zk, LABEL)
    assert first_done.wait(60)
    time.sleep(0.5)  # give the pool every chance to (wrongly) serve the second
    assert zk.get_node_request(second.id).state == RequestState.REQUESTED
    assert len(zk.nodes()) == 1
    nodes = take_nodes(zk, first)
    release(zk, nodes)
    assert second_done.wait(60)
    assert zk.get_node_request(second.id).state == RequestState.FULFILLED
    release(zk, take_nodes(zk, second))


def test_unknown_label_fails_with_reason(nodepool_factory, zk):
    nodepool_factory()
    req, done, seen = request(zk, "no-such-label")
    assert done.wait(30)
    fresh = zk.get_node_request(req.id)
    assert fresh.state == RequestState.FAILED
    assert fresh.reason == "no provider offers label no-such-label"
    assert zk.nodes() == []


def test_requestor_vanishes_nodes_destroyed(nodepool_factory, zk, zk_hosts):
    from nodepool_lite.zk import ZooKeeper

    nodepool = nodepool_factory()
    requestor = ZooKeeper(zk_hosts)
    requestor.connect()
    req, done, _ = request(requestor, LABEL)
    assert done.wait(60)
    [node_id] = zk.get_node_request(req.id).nodes
    requestor.disconnect()  # the ephemeral request goes with the session
    node = Node(id=node_id)
    wait_for(lambda: node_gone(zk, nodepool, node), 30, "orphaned node destroyed")


def test_restart_adopts_live_nodes_and_destroys_orphans(nodepool_factory, zk):
    first = nodepool_factory()
    req, done, _ = request(zk, LABEL)
    assert done.wait(60)
    [node] = take_nodes(zk, req)
    first.stop()
    first.join()
    nodes_dir = first.config.state_dir / "nodes"
    # A leaked node dir with no ZooKeeper record, and a used node whose
    # launcher died before destroying it.
    (nodes_dir / "9999999999" / "root").mkdir(parents=True)
    release(zk, [node])
    assert zk.get_node(node.id).state == NodeState.USED

    in_use, in_use_done, _ = request(zk, LABEL)
    second = nodepool_factory()
    wait_for(lambda: node_gone(zk, second, node), 30, "used node destroyed after restart")
    assert not (nodes_dir / "9999999999").exists()
    assert in_use_done.wait(60)
    [live] = take_nodes(zk, in_use)
    second.stop()
    second.join()

    # Its ssh forward survives the launcher; one that died is started again.
    [forward] = forward_pids(nodes_dir / live.id)
    os.kill(forward, signal.SIGKILL)
    wait_for(lambda: not forward_pids(nodes_dir / live.id), 10, "forward gone")
    third = nodepool_factory()  # the in-use node is still running: adopted (in start())
    assert forward_pids(nodes_dir / live.id)
    assert zk.get_node(live.id).state == NodeState.IN_USE
    assert container_pids(nodes_dir / live.id / "root")
    key = third.config.state_dir / "keys" / "id_ed25519"
    assert ssh_run(live, key, "id -un").strip() == "zuul"  # its forwarded port still works
    release(zk, [live])
    wait_for(lambda: node_gone(zk, third, live), 30, "adopted node destroyed once used")


def test_request_waits_for_image(tmp_path, zk, zk_hosts):
    """No ready image yet: the request stays queued, and is served as soon as
    the build turns ready (a ZooKeeper watch, not a poll)."""
    nodepool = NodePool(write_config(tmp_path, zk_hosts))
    nodepool.start()
    try:
        build = ImageBuild(builder="test")
        zk.store_image_build(IMAGE, build)
        req, done, _ = request(zk, LABEL)
        assert not done.wait(0.5)
        assert zk.get_node_request(req.id).state == RequestState.REQUESTED
        ready = register_node_image(zk)
        build.state, build.path = BuildState.READY, ready.path
        zk.store_image_build(IMAGE, build)
        assert done.wait(30)
        release(zk, take_nodes(zk, req))
        wait_for(lambda: not zk.nodes(), 30, "node destroyed")
    finally:
        nodepool.stop()
        nodepool.join()


@pytest.mark.slow
def test_kill_9_launcher_then_restart(tmp_path, zk, zk_hosts):
    """A launcher killed mid-boot: its in-use node keeps running and is adopted,
    the node it was booting is destroyed and its request served again."""
    register_node_image(zk)
    conf = write_config(tmp_path, zk_hosts)
    daemon = nodepool_process(conf)
    nodepool = None
    try:
        first, first_done, _ = request(zk, LABEL)
        assert first_done.wait(60)
        [in_use] = take_nodes(zk, first)
        second, second_done, _ = request(zk, LABEL)
        wait_for(lambda: any(n.allocated_to == second.id for n in zk.nodes()), 30, "second launch")
        daemon.kill()
        daemon.wait()
        nodepool = NodePool(conf)
        nodepool.start()
        assert second_done.wait(60)
        assert zk.get_node_request(second.id).state == RequestState.FULFILLED
        [fresh] = take_nodes(zk, second)
        assert container_pids(nodepool.config.state_dir / "nodes" / in_use.id / "root")
        assert zk.get_node(in_use.id).state == NodeState.IN_USE
        assert sorted(n.id for n in zk.nodes()) == sorted([in_use.id, fresh.id])
        release(zk, [in_use, fresh])
        wait_for(lambda: not zk.nodes(), 30, "nodes destroyed")
        wait_for(lambda: not nodepool.providers["local"].leaked_node_ids(), 30, "dirs gone")
    finally:
        if daemon.poll() is None:
            daemon.kill()
        if nodepool is not None:
            nodepool.stop()
            nodepool.join()


def test_launch_failure_fails_request_and_destroys_node(tmp_path, zk, zk_hosts):
    """An image without the zuul user: every attempt fails, the request fails
    with the driver's reason, and the failed node is destroyed."""
    broken = tmp_path / "broken-image"
    (broken / "rootfs" / "etc").mkdir(parents=True)
    (broken / "rootfs" / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    zk.store_image_build(IMAGE, ImageBuild(state=BuildState.READY, path=str(broken)))
    nodepool = NodePool(write_config(tmp_path, zk_hosts))
    nodepool.start()
    try:
        req, done, _ = request(zk, LABEL)
        assert done.wait(30)
        fresh = zk.get_node_request(req.id)
        assert fresh.state == RequestState.FAILED
        assert "The image has no user 'zuul'." in fresh.reason
        wait_for(lambda: not zk.nodes(), 30, "failed node destroyed")
        assert [p.name for p in (nodepool.config.state_dir / "nodes").iterdir()] in (
            [],
            [".trash"],
        )
    finally:
        nodepool.stop()
        nodepool.join()
