"""The qemu driver's `providers:` entry: a boot timeout, launch retries and
the accelerator; labels booted from a diskimage built with qcow2 in its
formats, with the memory, CPUs and disk of one VM."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import voluptuous as v

from nodepool_lite.drivers.base import (
    LabelConfig,
    PoolConfig,
    ProviderConfig,
    common_label,
    common_pool,
    common_provider,
)

ACCELS = ("auto", "kvm", "tcg")

_label = common_label(
    {
        v.Required("diskimage"): str,
        v.Optional("memory", default=1024): v.All(int, v.Range(min=128)),  # MiB
        v.Optional("cpus", default=1): v.All(int, v.Range(min=1)),
        # MiB: the virtual size of the node's overlay; the guest grows its
        # root filesystem to it at boot.
        v.Optional("disk", default=20480): v.All(int, v.Range(min=64)),
        v.Optional("username", default="zuul"): str,
    }
)
_pool = common_pool(_label, {})
SCHEMA = v.Schema(
    common_provider(
        _pool,
        {
            # From QEMU's start to a working ssh login, seconds.
            v.Optional("boot-timeout", default=180): v.All(v.Coerce(float), v.Range(min=1)),
            # auto: KVM when it really runs a guest here, else TCG.
            v.Optional("accel", default="auto"): v.In(
                ACCELS, msg=f"expected one of {', '.join(ACCELS)}"
            ),
        },
    )
)


@dataclass(frozen=True, kw_only=True)
class QemuLabel(LabelConfig):
    memory: int
    cpus: int
    disk: int
    username: str


@dataclass(frozen=True, kw_only=True)
class QemuPool(PoolConfig):
    labels: dict[str, QemuLabel]


@dataclass(frozen=True, kw_only=True)
class QemuProviderConfig(ProviderConfig):
    pools: list[QemuPool]  # type: ignore[assignment]
    boot_timeout: float
    accel: str
    # `<state-dir>/qemu/<provider>`: its copies of images, nodes and consoles.
    base_dir: Path


def load(data: dict[str, Any], top: dict[str, Any]) -> QemuProviderConfig:
    formats = {d["name"]: d["formats"] for d in top["diskimages"]}
    pools = []
    for qi, pool in enumerate(data["pools"]):
        labels = {}
        for li, lb in enumerate(pool["labels"]):
            if "qcow2" not in formats.get(lb["diskimage"], ["qcow2"]):
                raise v.Invalid(
                    f"diskimage {lb['diskimage']} boots in QEMU: add qcow2 to its formats",
                    ["pools", qi, "labels", li, "diskimage"],
                )
            labels[lb["name"]] = QemuLabel(
                name=lb["name"],
                diskimage=lb["diskimage"],
                memory=lb["memory"],
                cpus=lb["cpus"],
                disk=lb["disk"],
                username=lb["username"],
            )
        pools.append(QemuPool(name=pool["name"], max_servers=pool["max-servers"], labels=labels))
    return QemuProviderConfig(
        name=data["name"],
        driver=data["driver"],
        pools=pools,
        boot_timeout=data["boot-timeout"],
        launch_retries=data["launch-retries"],
        accel=data["accel"],
        base_dir=Path(top["state-dir"]).absolute() / "qemu" / data["name"],
    )
