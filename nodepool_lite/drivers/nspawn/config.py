"""The nspawn driver's `providers:` entry: pools with a boot timeout and host
mounts, labels booted from a diskimage with what one node may take."""

from __future__ import annotations

from dataclasses import dataclass
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

_bind = v.Any(str, {v.Required("host"): str, v.Optional("node"): str})
_label = common_label(
    {
        v.Required("diskimage"): str,
        # What one node of the label may take: MiB of memory, processes and
        # threads, CPUs (a quota; none by default), MiB of disk.
        v.Optional("memory", default=4096): v.All(int, v.Range(min=64)),
        v.Optional("tasks", default=4096): v.All(int, v.Range(min=16)),
        v.Optional("cpus"): v.All(v.Coerce(float), v.Range(min=0.1)),
        v.Optional("disk", default=20480): v.All(int, v.Range(min=64)),
        # Mounts for this label's nodes only, beside the pool's: the shared
        # compiler cache is read-only for untrusted labels and writable for
        # the trusted one.
        v.Optional("bind-ro", default=list): [_bind],
        v.Optional("bind", default=list): [_bind],
    }
)
_pool = common_pool(
    _label,
    {
        v.Optional("boot-timeout", default=60): v.All(v.Coerce(float), v.Range(min=1)),
        v.Optional("bind-ro", default=list): [_bind],
        v.Optional("bind", default=list): [_bind],
    },
)
SCHEMA = v.Schema(common_provider(_pool, {}))


@dataclass(frozen=True)
class Limits:
    """What one node of a label may take of its host (limits.py)."""

    memory_mb: int
    tasks: int
    cpus: float | None  # None: no CPU quota
    disk_mb: int


DEFAULT_LIMITS = Limits(memory_mb=4096, tasks=4096, cpus=None, disk_mb=20480)


@dataclass(frozen=True)
class Bind:
    """A host path mounted into every node at `node` (the same path by default)."""

    host: str
    node: str


@dataclass(frozen=True, kw_only=True)
class NspawnLabel(LabelConfig):
    limits: Limits = DEFAULT_LIMITS
    bind_ro: tuple[Bind, ...] = ()
    bind: tuple[Bind, ...] = ()


@dataclass(frozen=True, kw_only=True)
class NspawnPool(PoolConfig):
    labels: dict[str, NspawnLabel]
    boot_timeout: float
    bind_ro: list[Bind]
    bind: list[Bind]

    def mounts(self, label: str) -> list[tuple[Bind, bool]]:
        """(bind, writable) for a node of `label`: the pool's, then the label's."""
        own = self.labels.get(label)
        return [
            *((b, False) for b in self.bind_ro),
            *((b, True) for b in self.bind),
            *((b, False) for b in (own.bind_ro if own else ())),
            *((b, True) for b in (own.bind if own else ())),
        ]


def _binds(entries: list[Any]) -> list[Bind]:
    return [
        Bind(e, e) if isinstance(e, str) else Bind(e["host"], e.get("node", e["host"]))
        for e in entries
    ]


def _check_mount_points(binds: list[Any], where: list[Any]) -> None:
    """One mount per node path: a path both read-only and writable would leave
    which one wins to nspawn's argument order."""
    seen = set()
    for bind in _binds(binds):
        if bind.node in seen:
            raise v.Invalid(f"{bind.node} is mounted twice (pool and label binds)", where)
        seen.add(bind.node)


def load(data: dict[str, Any]) -> ProviderConfig:
    pools = []
    for qi, pool in enumerate(data["pools"]):
        for li, label in enumerate(pool["labels"]):
            _check_mount_points(
                [*pool["bind-ro"], *pool["bind"], *label["bind-ro"], *label["bind"]],
                ["pools", qi, "labels", li],
            )
        labels = {
            lb["name"]: NspawnLabel(
                name=lb["name"],
                diskimage=lb["diskimage"],
                limits=Limits(lb["memory"], lb["tasks"], lb.get("cpus"), lb["disk"]),
                bind_ro=tuple(_binds(lb["bind-ro"])),
                bind=tuple(_binds(lb["bind"])),
            )
            for lb in pool["labels"]
        }
        pools.append(
            NspawnPool(
                name=pool["name"],
                max_servers=pool["max-servers"],
                labels=labels,
                boot_timeout=pool["boot-timeout"],
                bind_ro=_binds(pool["bind-ro"]),
                bind=_binds(pool["bind"]),
            )
        )
    return ProviderConfig(
        name=data["name"],
        driver=data["driver"],
        pools=pools,
        launch_retries=data["launch-retries"],
    )
