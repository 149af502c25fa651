"""Helpers for nodepool launcher tests: a node image, a config, bounded waits.

Tests boot real nspawn nodes. They use the real dib image when the builder
has one cached for the current elements/ (tests/images.py), else a quick
debootstrap rootfs (built once per machine under the cache) with the same
`zuul` user, so the launcher is testable before the first dib build.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
import time
from pathlib import Path

import yaml

from nodepool_lite.builder import cache_root
from nodepool_lite.model import BuildState, ImageBuild
from nodepool_lite.zk import ZooKeeper

IMAGE = "kernel-ci-debian"
LABEL = "kernel-debian"


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


def write_config(
    directory: Path,
    zk_hosts: str,
    max_servers: int = 2,
    labels: tuple[str, ...] = (LABEL,),
    bind_ro: list[str] | None = None,
    limits: dict | None = None,
) -> Path:
    """A nodepool.yaml for one nspawn pool, its state dir under `directory`;
    `limits` (memory, tasks, cpus, disk) apply to every label."""
    hosts, _, chroot = zk_hosts.partition("/")
    host, port = hosts.split(":")
    data = {
        "zookeeper-servers": [{"host": host, "port": int(port), "chroot": chroot}],
        "state-dir": str(directory / "state"),
        "labels": [{"name": label} for label in labels],
        "diskimages": [{"name": IMAGE, "elements": ["debian-minimal", "kernel-ci-node"]}],
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
                        "bind": [{"host": str(directory / "ccache"), "node": "/var/cache/ccache"}],
                        "labels": [
                            {"name": label, "diskimage": IMAGE, **(limits or {})}
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
