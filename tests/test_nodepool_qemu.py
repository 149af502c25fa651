"""The qemu driver: real QEMU VMs (TCG here) booted by the real launcher from
a real diskimage-builder image (tests/qemu_env.py), real ZooKeeper, real ssh."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import paramiko
import pytest
import yaml

from nodepool_lite import config as nodepool_config
from nodepool_lite.drivers.qemu import provider as qemu_provider
from nodepool_lite.drivers.qemu.images import ImageStore
from nodepool_lite.drivers.qemu.provider import qemu_pids
from nodepool_lite.drivers.sshscan import node_client
from nodepool_lite.exceptions import ConfigError
from nodepool_lite.launcher import NodePool
from nodepool_lite.model import Node, NodeState, RequestState
from tests.nodepool_env import release, request, take_nodes, wait_for
from tests.qemu_env import MEMORY, PROVIDER, VM_LABEL, ready_vm_image, write_qemu_config

REPO = Path(__file__).resolve().parent.parent
BOOT = 300  # seconds a request may take: one TCG boot on a loaded host

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="dib builds and VMs need root")
vm_image = pytest.mark.node_image("vm-debian")


def ssh(nodepool: NodePool, node: Node, command: str) -> tuple[int, str]:
    """Run `command` on the node as its user, with the launcher's key, checking
    the host key the node record gives. Patient: a TCG guest on a busy host
    may take tens of seconds for a key exchange (`timeout` bounds it too)."""
    key = paramiko.Ed25519Key.from_private_key_file(
        str(nodepool.config.state_dir / "keys/id_ed25519")
    )
    client = node_client(node.interface_ip, node.connection_port, node.host_keys[0])
    client.connect(
        node.interface_ip, port=node.connection_port, username=node.username, pkey=key,
        timeout=60, banner_timeout=60, auth_timeout=60, allow_agent=False, look_for_keys=False,
    )  # fmt: skip
    try:
        _, stdout, stderr = client.exec_command(command, timeout=60)
        out = stdout.read().decode() + stderr.read().decode()
        return stdout.channel.recv_exit_status(), out
    finally:
        client.close()


def assert_guest_reaches_no_host_port(nodepool: NodePool, node: Node) -> None:
    """A port listening on the host's loopback is what a guest would reach at
    10.0.2.2 without `restrict=on`; with it, the connection gets nowhere."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        probe = f"timeout 5 bash -c 'exec 3<>/dev/tcp/10.0.2.2/{port}' && echo reached"
        rc, out = ssh(nodepool, node, probe)
        assert rc != 0 and "reached" not in out, out
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()


def assert_nothing_left(nodepool: NodePool) -> None:
    provider = nodepool.providers[PROVIDER]
    wait_for(lambda: not nodepool.zk.nodes(), 60, "nodes deleted")
    wait_for(lambda: not provider.leaked_node_ids(), 30, "QEMU processes and overlays gone")
    assert not list(provider.nodes_dir.iterdir())


@needs_root
@vm_image
def test_request_boots_a_vm_ssh_works_and_delete_leaves_nothing(tmp_path, zk, zk_hosts):
    conf = write_qemu_config(tmp_path, zk_hosts)
    ready_vm_image(zk, conf)
    nodepool = NodePool(conf)
    nodepool.start()
    try:
        req, done, _ = request(zk, VM_LABEL)
        assert done.wait(BOOT), "no VM within the boot budget"
        fresh = zk.get_node_request(req.id)
        assert fresh.state == RequestState.FULFILLED, fresh.reason
        [node] = take_nodes(zk, req)
        rc, out = ssh(nodepool, node, "id -un; cat /proc/cmdline; findmnt -n -o SOURCE /")
        assert rc == 0 and out.split()[0] == "zuul", out
        assert "root=/dev/vda" in out
        # The label's CPUs and memory; an ed25519 host key only (no RSA made at boot).
        rc, out = ssh(nodepool, node, "nproc; grep MemTotal /proc/meminfo; ls /etc/ssh")
        lines = out.split("\n")
        assert rc == 0 and lines[0] == "1", out
        assert 0.7 * MEMORY * 1024 < int(lines[1].split()[1]) <= MEMORY * 1024, out
        assert sorted(f for f in lines[2:] if f.startswith("ssh_host_")) == [
            "ssh_host_ed25519_key",
            "ssh_host_ed25519_key.pub",
        ], out
        assert_guest_reaches_no_host_port(nodepool, node)
        console = Path(node.console_log)
        assert "Linux version" in console.read_text(errors="replace")
        overlay = nodepool.providers[PROVIDER].node_dir(node.id) / "overlay.qcow2"
        assert overlay.is_file()
        release(zk, [node])
        assert_nothing_left(nodepool)
        assert console.is_file()  # kept after the node: it explains failed boots
    finally:
        nodepool.stop()
        nodepool.join()


@needs_root
@vm_image
def test_kill_9_launcher_mid_boot_adopts_running_vm_and_deletes_orphan(tmp_path, zk, zk_hosts):
    """A launcher killed while it boots a VM: on restart the VM of the in-use
    node runs on (same QEMU, ssh still works), the VM it was booting, whose
    request went with its requestor, is killed and its overlay deleted."""
    conf = write_qemu_config(tmp_path, zk_hosts, accel="tcg")  # the other test tries KVM
    ready_vm_image(zk, conf)
    daemon = subprocess.Popen(
        [sys.executable, "-m", "nodepool_lite.cmd.nodepoolcmd", "-c", str(conf), "launcher"],
        env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True,
    )  # fmt: skip
    nodepool = None
    try:
        first, first_done, _ = request(zk, VM_LABEL)
        assert first_done.wait(BOOT)
        [in_use] = take_nodes(zk, first)
        second, _, _ = request(zk, VM_LABEL)

        def second_qemu() -> str | None:
            return next((n for n in qemu_pids_under(tmp_path) if n != in_use.id), None)

        orphan = wait_for(second_qemu, 60, "the second VM's QEMU starting")
        assert zk.get_node(orphan).allocated_to == second.id
        daemon.kill()
        daemon.wait()
        zk.delete_node_request(zk.get_node_request(second.id))  # its requestor left too
        before = qemu_pids_under(tmp_path)
        assert set(before) == {in_use.id, orphan}
        nodepool = NodePool(conf)
        nodepool.start()
        provider = nodepool.providers[PROVIDER]
        wait_for(
            lambda: orphan not in provider.leaked_node_ids() and zk.get_node(orphan) is None,
            60,
            "the orphan's QEMU, overlay and record gone",
        )
        assert provider.qemu_pids() == {in_use.id: before[in_use.id]}  # the same QEMU
        assert zk.get_node(in_use.id).state == NodeState.IN_USE
        rc, out = ssh(nodepool, in_use, "id -un")
        assert rc == 0 and out.strip() == "zuul", out
        release(zk, [in_use])
        assert_nothing_left(nodepool)
    finally:
        if daemon.poll() is None:
            daemon.kill()
        if nodepool is not None:
            nodepool.stop()
            nodepool.join()
        kill_vms_under(tmp_path)


def qemu_pids_under(directory: Path) -> dict[str, list[int]]:
    """The QEMU processes of this test's nodes."""
    state_dir = nodepool_config.load(directory / "nodepool.yaml").state_dir
    return qemu_pids(state_dir / "qemu" / PROVIDER / "nodes")


def kill_vms_under(directory: Path) -> None:
    """A failed test leaves no VM running."""
    for pids in qemu_pids_under(directory).values():
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _uncommented(text: str, first: str) -> list:
    """The commented YAML block starting at line `first` of etc/nodepool.yaml."""
    lines = text.splitlines()
    start = lines.index(first)
    indent = first.index("#")
    block = [lines[start]]
    for line in lines[start + 1 :]:
        if not line.startswith(" " * indent + "#   ") and not line.startswith(
            " " * indent + "#  "
        ):
            break
        block.append(line)
    return yaml.safe_load("\n".join(ln[indent:].replace("# ", "", 1) for ln in block))


def test_example_qemu_provider_in_etc_is_valid(tmp_path):
    """The commented-out qemu provider and its diskimage of etc/nodepool.yaml,
    as an operator uncomments them."""
    text = (REPO / "etc" / "nodepool.yaml").read_text()
    data = yaml.safe_load(text)
    [diskimage] = _uncommented(text, "  # - name: kernel-ci-vm")
    [provider] = _uncommented(text, "  # - name: vms")
    data["diskimages"].append(diskimage)
    data["providers"] = [provider]
    data["labels"] += [{"name": lb["name"]} for lb in provider["pools"][0]["labels"]]
    data.pop("zookeeper-tls")
    path = tmp_path / "nodepool.yaml"
    path.write_text(yaml.safe_dump(data))
    config = nodepool_config.load(path)
    assert config.providers[0].driver == "qemu"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"formats": ["tar"]}, "providers[0].pools[0].labels[0].diskimage: diskimage vm-debian "
         "boots in QEMU: add qcow2 to its formats"),
        ({"accel": "hvf"}, "providers[0].accel: expected one of auto, kvm, tcg"),
        ({"memory": 16}, "providers[0].pools[0].labels[0].memory: value must be at least 128"),
    ],
)  # fmt: skip
def test_bad_config_is_one_sentence(tmp_path, change, message):
    path = write_qemu_config(tmp_path, "127.0.0.1:2181")
    data = yaml.safe_load(path.read_text())
    if "formats" in change:
        data["diskimages"][0].update(change)
    elif "accel" in change:
        data["providers"][0].update(change)
    else:
        data["providers"][0]["pools"][0]["labels"][0].update(change)
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as error:
        nodepool_config.load(path)
    assert str(error.value) == f"{path}: {message}"


def test_image_store_sweeps_what_unfinished_uploads_left(tmp_path):
    """On the builder's start: a half copy and a whole one whose upload is
    not kept go; a kept one and one that says nothing of its upload stay."""
    build = tmp_path / "build"
    (build / "rootfs" / "boot").mkdir(parents=True)
    (build / "rootfs" / "boot" / "vmlinuz-6.1").write_bytes(b"kernel")
    (build / "rootfs" / "boot" / "initrd.img-6.1").write_bytes(b"initrd")
    (build / "img.qcow2").write_bytes(b"QFI\xfb")
    store = ImageStore(tmp_path / "images")

    def meta(build_id: str) -> dict[str, str]:
        return {"nodepool_build_id": build_id, "nodepool_upload_id": "0000000000"}

    store.upload("img-1", build / "img.qcow2", meta("1"))
    store.upload("img-2", build / "img.qcow2", meta("2"))
    (tmp_path / "images" / ".img-3.4242").mkdir()  # its builder died while copying
    (tmp_path / "images" / "img-0").mkdir()  # stored before uploads said whose they are
    assert store.sweep({("1", "0000000000")}) == [".img-3.4242", "img-2"]
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["img-0", "img-1"]
    assert store.image("img-1") is not None


def test_kvm_failure_is_remembered_until_the_host_reboots(tmp_path, monkeypatch):
    """A launcher restarted or reloaded does not probe KVM again (20 s of a
    silent guest) on a host where it failed; after a reboot it does."""
    boot_id = tmp_path / "boot_id"
    boot_id.write_text("boot-1\n")
    monkeypatch.setattr(qemu_provider, "BOOT_ID", boot_id)
    assert not qemu_provider.kvm_failed_here(tmp_path)
    qemu_provider.record_kvm_failure(tmp_path, "no console output 20s after QEMU started")
    assert qemu_provider.kvm_failed_here(tmp_path)
    boot_id.write_text("boot-2\n")
    assert not qemu_provider.kvm_failed_here(tmp_path)
