"""Helpers for nodepool launcher tests: a node image, a config, bounded waits.

Tests boot real nspawn nodes. They use the real dib image when the builder
has one cached for the current elements/ (tests/images.py), else a quick
debootstrap rootfs (built once per machine under the cache) with the same
`zuul` user, so the launcher is testable before the first dib build.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from nodepool_lite.builder import cache_root
from nodepool_lite.model import (
    BuildState,
    ImageBuild,
    Node,
    NodeRequest,
    NodeState,
    RequestState,
)
from nodepool_lite.zk import ZooKeeper

REPO = Path(__file__).resolve().parent.parent
IMAGE = "kernel-ci-debian"
LABEL = "kernel-debian"
TRUSTED_LABEL = "kernel-debian-trusted"  # the shared compiler cache is writable on it
STATIC_LABEL = "static-label"
STATIC_OTHER = "other-label"


def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):
    """Bounded wait for tests (code under test waits on events)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def ensure_dev_rootfs() -> Path:
    """`<cache>/dev-image/rootfs`: debootstrap minbase + sshd, python3, sudo and
    a passwordless-sudo `zuul` user without host keys (nodes get their own)."""
    image_dir = cache_root() / "dev-image"
    rootfs = cache_root() / "dev-rootfs"
    marker = rootfs / ".zuul-lite-ready"
    image_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_root() / ".dev-rootfs.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not marker.exists():
            if not (rootfs / "usr/sbin/sshd").exists():
                tmp = cache_root() / "dev-rootfs.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                subprocess.run(
                    ["debootstrap", "--variant=minbase",
                     "--include=openssh-server,python3,sudo", "bookworm", str(tmp),
                     "http://deb.debian.org/debian"],
                    check=True, capture_output=True,
                )  # fmt: skip
                shutil.rmtree(rootfs, ignore_errors=True)
                tmp.rename(rootfs)
            passwd = (rootfs / "etc/passwd").read_text()
            if "\nzuul:" not in passwd:
                subprocess.run(
                    ["chroot", str(rootfs), "useradd", "-m", "-s", "/bin/bash", "zuul"], check=True
                )
            sudoers = rootfs / "etc/sudoers.d/zuul"
            sudoers.write_text("zuul ALL=(ALL) NOPASSWD:ALL\n")
            sudoers.chmod(0o440)
            for key in (rootfs / "etc/ssh").glob("ssh_host_*"):
                key.unlink()
            marker.write_text("ok\n")
    link = image_dir / "rootfs"
    if not link.is_symlink():
        link.symlink_to(rootfs)
    return image_dir


def register_node_image(zk: ZooKeeper, image: str = IMAGE) -> ImageBuild:
    """A `ready` ImageBuild of `image` in `zk`: the cached real build if the
    builder has one for the current elements/, else the debootstrap rootfs."""
    from tests.images import MARKER, image_key, node_config

    diskimage = node_config(Path("/tmp")).diskimage(image)
    marker = cache_root() / "images" / f"{image}-{image_key(diskimage)}" / MARKER
    marker.parent.parent.mkdir(parents=True, exist_ok=True)
    with open(marker.parent.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)  # a build under way (the session's prebuild) ends first
    if marker.exists():
        data = json.loads(marker.read_text())
        data.pop("id", None)
        build = ImageBuild.from_dict(data)
        if (Path(build.path) / "rootfs").is_dir():
            zk.store_image_build(image, build)
            return build
    build = ImageBuild(state=BuildState.READY, path=str(ensure_dev_rootfs()), builder="dev")
    zk.store_image_build(image, build)
    return build


def example_diskimage() -> dict:
    """etc/nodepool.yaml's entry for IMAGE: the same image key (tests/images.py),
    so these tests boot the one test image the e2e tests build."""
    example = yaml.safe_load((REPO / "etc" / "nodepool.yaml").read_text())
    return next(d for d in example["diskimages"] if d["name"] == IMAGE)


def zookeeper_servers(zk_hosts: str) -> list[dict]:
    """nodepool.yaml's zookeeper-servers for a kazoo string `host:port/chroot`."""
    hosts, _, chroot = zk_hosts.partition("/")
    host, port = hosts.split(":")
    return [{"host": host, "port": int(port), "chroot": chroot}]


def write_config(
    directory: Path,
    zk_hosts: str,
    max_servers: int = 2,
    labels: tuple[str, ...] = (LABEL, TRUSTED_LABEL),
    bind_ro: list[str] | None = None,
    limits: dict | None = None,
    ccache: Path | None = None,
    min_ready: int = 0,
) -> Path:
    """A nodepool.yaml for one nspawn pool, its state dir under `directory`;
    `limits` (memory, tasks, cpus, disk) apply to every label. The compiler
    cache (`ccache`, default `directory/ccache`) is mounted as etc/nodepool.yaml
    does: read-only but on TRUSTED_LABEL. `min_ready` applies to LABEL."""
    shared = ccache or directory / "ccache"
    ccache_bind = [{"host": str(shared), "node": "/var/cache/ccache"}]
    data = {
        "zookeeper-servers": zookeeper_servers(zk_hosts),
        "state-dir": str(directory / "state"),
        "labels": [
            {"name": label, "min-ready": min_ready if label == LABEL else 0} for label in labels
        ],  # fmt: skip
        "diskimages": [example_diskimage()],
        "providers": [
            {
                "name": "local",
                "driver": "nspawn",
                "pools": [
                    {
                        "name": "main",
                        "max-servers": max_servers,
                        "boot-timeout": 30,
                        "bind-ro": bind_ro or [],
                        "labels": [
                            {
                                "name": label,
                                "diskimage": IMAGE,
                                ("bind" if label == TRUSTED_LABEL else "bind-ro"): ccache_bind,
                                **(limits or {}),
                            }
                            for label in labels
                        ],
                    }
                ],
            }
        ],
    }
    path = directory / "nodepool.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def request(zk, *labels: str) -> tuple[NodeRequest, threading.Event, list]:
    """Submit like zuul-launcher does; the event fires when the request is done."""
    done = threading.Event()
    seen: list[NodeRequest | None] = []

    def watcher(req: NodeRequest | None) -> bool | None:
        seen.append(req)
        if req is None or req.state in (RequestState.FULFILLED, RequestState.FAILED):
            done.set()
        return None

    req = NodeRequest(node_types=list(labels), requestor="test")
    zk.submit_node_request(req, watcher)
    return req, done, seen


def take_nodes(zk, req: NodeRequest) -> list[Node]:
    """The requestor's side of the handshake: lock, in-use, delete the request."""
    fresh = zk.get_node_request(req.id)
    assert fresh.state == RequestState.FULFILLED, fresh
    nodes = []
    for node_id in fresh.nodes:
        node = zk.get_node(node_id)
        zk.lock_node(node)
        assert node.state == NodeState.READY and node.allocated_to == req.id
        node.state = NodeState.IN_USE
        zk.store_node(node)
        nodes.append(node)
    zk.delete_node_request(fresh)
    return nodes


def release(zk, nodes: list[Node]) -> None:
    for node in nodes:
        node.state = NodeState.USED
        zk.store_node(node)
        zk.unlock_node(node)


@contextmanager
def launchers() -> Iterator[Callable[[Path], object]]:
    """`start(config path)` starts a NodePool in this process; all are
    stopped at the end."""
    from nodepool_lite.launcher import NodePool

    started: list[NodePool] = []

    def start(path: Path) -> NodePool:
        np = NodePool(path)
        np.start()
        started.append(np)
        return np

    try:
        yield start
    finally:
        for np in started:
            np.stop()
            np.join()


def nodepool_process(conf: Path, command: str = "launcher", log=None) -> subprocess.Popen:
    """`nodepool <command>` as its own process (session), to be killed with -9;
    its output to `log` (an open file), else the test's."""
    return subprocess.Popen(
        [sys.executable, "-m", "nodepool_lite.cmd.nodepoolcmd", "-c", str(conf), command],
        env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True,
        stdout=log, stderr=subprocess.STDOUT if log else None,
    )  # fmt: skip


HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDKCz4ZcdtvM0NRm0xTAOKJXqCzFbGJtOcbF5N6vjXjk"


def static_host(name: str, port: int, labels: list[str], key: bool = True) -> dict:
    """A static host entry; without `key` the launcher scans its ssh host key."""
    entry = {"name": name, "labels": labels, "connection-port": port}
    return entry | ({"host-key": HOST_KEY} if key else {})


def static_config(directory: Path, zk_hosts: str, providers: dict[str, list[dict]], **top) -> Path:
    """One static provider (pool `main`) per entry: name -> its hosts."""
    data = {
        "zookeeper-servers": zookeeper_servers(zk_hosts),
        "state-dir": str(directory / "state"),
        "labels": top.pop("labels", [{"name": STATIC_LABEL}, {"name": STATIC_OTHER}]),
        "providers": [
            {
                "name": name,
                "driver": "static",
                "launch-retries": 2,
                "pools": [{"name": "main", "max-servers": len(nodes), "nodes": nodes}],
            }
            for name, nodes in providers.items()
        ],
    }
    path = directory / "nodepool.yaml"
    path.write_text(yaml.safe_dump(data))
    return path
