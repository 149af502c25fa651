"""`nodepool alien-list` for the drivers that run nodes on this host: real
QEMU and systemd-nspawn processes in the drivers' naming (QEMU without a
machine, nspawn running busybox in a two-directory tree: what the drivers'
discovery sees, in well under a second), real ZooKeeper, the real CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from nodepool_lite import config as nodepool_config
from nodepool_lite.cmd.nodepoolcmd import main
from nodepool_lite.drivers.nspawn.provider import NspawnProvider
from nodepool_lite.drivers.qemu.provider import QEMU, QemuProvider
from nodepool_lite.model import Node
from tests.nodepool_env import write_config
from tests.qemu_env import PROVIDER, write_qemu_config

ORPHAN = "0000009001"  # runs, but ZooKeeper has no record of it
LEFT = "0000009002"  # only its directory is left


def alien_rows(capsys, conf: Path) -> tuple[int, list[list[str]], str]:
    capsys.readouterr()
    rc = main(["-c", str(conf), "alien-list"])
    out, err = capsys.readouterr()
    return rc, [line.split() for line in out.splitlines()[1:]], err


def known_node(zk, provider: str) -> str:
    return zk.store_node(Node(type="label", provider=provider, pool="main"))


@contextmanager
def running(*procs: subprocess.Popen) -> Iterator[None]:
    try:
        yield
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)


def start_qemu(overlay: Path, name: str) -> subprocess.Popen:
    """A real QEMU holding `overlay` open as the driver's do, with no machine to run."""
    overlay.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", overlay, "1M"], check=True)
    return subprocess.Popen(
        [QEMU, "-name", name, "-nodefaults", "-no-user-config", "-display", "none",
         "-machine", "none", "-S", "-drive", f"file={overlay},if=none,format=qcow2"],
        stdin=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip


def test_qemu_alien_list(tmp_path, zk_hosts, zk, capsys):
    conf = write_qemu_config(tmp_path, zk_hosts)
    [provider] = nodepool_config.load(conf).providers
    nodes = provider.base_dir / "nodes"
    known = known_node(zk, PROVIDER)
    (nodes / LEFT).mkdir(parents=True)
    procs = [
        start_qemu(nodes / known / "overlay.qcow2", f"np-{known}"),
        start_qemu(nodes / ORPHAN / "overlay.qcow2", f"np-{ORPHAN}"),
        start_qemu(tmp_path / "elsewhere" / ORPHAN / "overlay.qcow2", "not-ours"),
    ]
    with running(*procs):
        rc, rows, err = alien_rows(capsys, conf)
        assert (rc, err) == (0, "")
        assert rows == [[PROVIDER, ORPHAN, f"np-{ORPHAN}"], [PROVIDER, LEFT, str(nodes / LEFT)]]
        # Listed, never touched.
        assert all(proc.poll() is None for proc in procs)
        assert {p.name for p in nodes.iterdir()} == {known, ORPHAN, LEFT}
        # What a launcher's leak cleanup sees, through the same discovery.
        launcher_side = QemuProvider(provider, tmp_path / "state", zk)
        assert launcher_side.leaked_node_ids() == sorted([known, ORPHAN, LEFT])


def start_nspawn(root: Path) -> subprocess.Popen:
    """A real container in the nspawn driver's naming: busybox sleeping."""
    (root / "bin").mkdir(parents=True)
    (root / "usr").mkdir()  # what nspawn checks for an OS tree
    (root / "etc").mkdir()
    (root / "etc/os-release").touch()
    shutil.copy("/usr/bin/busybox", root / "bin/busybox")  # statically linked
    return subprocess.Popen(
        ["systemd-nspawn", "--quiet", "-D", root, "--register=no", "--keep-unit", "--as-pid2",
         f"--machine=np-{root.parent.name}", "--console=pipe", "--private-network",
         "/bin/busybox", "sleep", "600"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip


@pytest.mark.skipif(os.geteuid() != 0, reason="nspawn containers need root")
def test_nspawn_alien_list(tmp_path, zk_hosts, zk, capsys):
    conf = write_config(tmp_path, zk_hosts)
    nodes = tmp_path / "state" / "nodes"
    known = known_node(zk, "local")
    (nodes / LEFT).mkdir(parents=True)
    (nodes / ".trash" / "0000000001-1").mkdir(parents=True)  # the driver's, being removed
    procs = [start_nspawn(nodes / known / "root"), start_nspawn(nodes / ORPHAN / "root")]
    with running(*procs):
        rc, rows, err = alien_rows(capsys, conf)
        assert (rc, err) == (0, "")
        assert rows == [["local", ORPHAN, f"np-{ORPHAN}"], ["local", LEFT, str(nodes / LEFT)]]
        assert all(proc.poll() is None for proc in procs)
        assert {p.name for p in nodes.iterdir()} == {known, ORPHAN, LEFT, ".trash"}
        [provider] = nodepool_config.load(conf).providers
        launcher_side = NspawnProvider(provider, tmp_path / "state", zk)
        assert launcher_side.leaked_node_ids() == sorted([known, ORPHAN, LEFT])
