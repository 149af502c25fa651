"""The qemu driver's test (and bench) setup: a VM image and a config.

The image is a real diskimage-builder build (`debian-minimal vm-node`,
formats tar and qcow2), cached machine-wide by tests/images.py like the
nspawn node image, so only a cold run builds it; `ready_vm_image()` then
registers it in the test's ZooKeeper and runs the builder's upload pass,
which copies it into the provider (its `images/`), as the builder daemon does.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from nodepool_lite import config as nodepool_config
from nodepool_lite.model import ImageBuild
from nodepool_lite.uploader import upload_pass, uploaders
from nodepool_lite.zk import ZooKeeper
from tests.images import ensure_node_image
from tests.nodepool_env import zookeeper_servers

VM_IMAGE = "vm-debian"
VM_LABEL = "vm"
PROVIDER = "vms"
# The smallest guest that boots the image quickly (QEMU's RSS is about this
# plus 100-200 MiB); the host has 2 cores, so one vCPU.
MEMORY = 512


def write_qemu_config(
    directory: Path, zk_hosts: str, max_servers: int = 2, accel: str = "auto"
) -> Path:
    """`accel: auto` tries KVM first (20 s here, where it runs no guest)."""
    data = {
        "zookeeper-servers": zookeeper_servers(zk_hosts),
        "state-dir": str(directory / "state"),
        "labels": [{"name": VM_LABEL}],
        "diskimages": [
            {
                "name": VM_IMAGE,
                "elements": ["debian-minimal", "vm-node"],
                "formats": ["tar", "qcow2"],
            }
        ],
        "providers": [
            {
                "name": PROVIDER,
                "driver": "qemu",
                "boot-timeout": 300,  # TCG on a loaded 2-core host
                "launch-retries": 1,
                "accel": accel,
                "pools": [
                    {
                        "name": "main",
                        "max-servers": max_servers,
                        "labels": [
                            {
                                "name": VM_LABEL,
                                "diskimage": VM_IMAGE,
                                "memory": MEMORY,
                                "cpus": 1,
                                "disk": 4096,
                            }
                        ],
                    }
                ],
            }
        ],
    }
    path = directory / "nodepool.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def ready_vm_image(zk: ZooKeeper, config_path: Path) -> ImageBuild:
    """The cached (or, cold, freshly built) VM image as a ready build in `zk`,
    uploaded to the config's qemu provider."""
    config = nodepool_config.load(config_path)
    build = ensure_node_image(zk, config, VM_IMAGE)
    upload_pass(zk, uploaders(config))
    return build
