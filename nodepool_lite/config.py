"""Load and validate `nodepool.yaml` (format in doc/architecture.md).

The voluptuous schema sits next to the loader so a key is described once.
Every error is one sentence naming the file and the key path, e.g.
"etc/nodepool.yaml: providers[0].pools[0].max-servers: expected int", because
operators fix configs from that line alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import voluptuous as v
import yaml

from nodepool_lite import tls
from nodepool_lite.exceptions import ConfigError
from nodepool_lite.tls import TLSFiles

DEFAULT_STATE_DIR = "/var/lib/zuul-lite"

_zk_server = {
    v.Required("host"): str,
    v.Optional("port", default=2181): int,
    v.Optional("chroot"): str,
}
_label = {v.Required("name"): str}
_diskimage = {
    v.Required("name"): str,
    v.Required("elements"): [str],
    v.Optional("release", default="bookworm"): str,
    v.Optional("rebuild-age", default=86400): int,
    v.Optional("env-vars", default=dict): {str: v.Coerce(str)},
    v.Optional("formats", default=lambda: ["tar"]): [str],
}
_bind = v.Any(str, {v.Required("host"): str, v.Optional("node"): str})
_pool_label = {
    v.Required("name"): str,
    v.Optional("diskimage"): str,
    # What one node of the label may take (container drivers): MiB of memory,
    # processes and threads, CPUs (a quota; none by default), MiB of disk.
    v.Optional("memory", default=4096): v.All(int, v.Range(min=64)),
    v.Optional("tasks", default=4096): v.All(int, v.Range(min=16)),
    v.Optional("cpus"): v.All(v.Coerce(float), v.Range(min=0.1)),
    v.Optional("disk", default=20480): v.All(int, v.Range(min=64)),
    # Mounts for this label's nodes only, beside the pool's: the shared compiler
    # cache is read-only for untrusted labels and writable for the trusted one.
    v.Optional("bind-ro", default=list): [_bind],
    v.Optional("bind", default=list): [_bind],
}
_static_node = {
    v.Required("name"): str,
    v.Required("labels"): [str],
    v.Optional("username", default="zuul"): str,
    v.Optional("connection-port", default=22): int,
    v.Optional("host-key"): str,
}
_pool = {
    v.Required("name"): str,
    v.Optional("max-servers", default=1): v.All(int, v.Range(min=0)),
    v.Optional("boot-timeout", default=60): v.All(v.Coerce(float), v.Range(min=1)),
    v.Optional("bind-ro", default=list): [_bind],
    v.Optional("bind", default=list): [_bind],
    v.Optional("labels", default=list): [_pool_label],
    v.Optional("nodes", default=list): [_static_node],
}
_provider = {
    v.Required("name"): str,
    v.Required("driver"): v.In(["nspawn", "static"], msg="expected nspawn or static"),
    v.Required("pools"): [_pool],
}
SCHEMA = v.Schema(
    {
        v.Optional("zookeeper-servers", default=lambda: [{"host": "127.0.0.1"}]): [_zk_server],
        # Nodepool's key: the client certificate; without it ZooKeeper is plain TCP.
        v.Optional("zookeeper-tls"): tls.SCHEMA,
        v.Optional("state-dir", default=DEFAULT_STATE_DIR): str,
        v.Optional("labels", default=list): [_label],
        v.Optional("diskimages", default=list): [_diskimage],
        v.Optional("providers", default=list): [_provider],
    }
)


@dataclass(frozen=True)
class Limits:
    """What one node of a label may take of its host (nodepool_lite/drivers/limits.py)."""

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


@dataclass(frozen=True)
class DiskImage:
    name: str
    elements: list[str]
    release: str
    rebuild_age: int
    env_vars: dict[str, str]
    formats: list[str]


@dataclass(frozen=True)
class PoolLabel:
    name: str
    diskimage: str | None
    limits: Limits = DEFAULT_LIMITS
    bind_ro: tuple[Bind, ...] = ()
    bind: tuple[Bind, ...] = ()


@dataclass(frozen=True)
class StaticNode:
    name: str  # host name or address
    labels: list[str]
    username: str
    connection_port: int
    host_key: str | None


@dataclass(frozen=True)
class Pool:
    name: str
    max_servers: int
    boot_timeout: float
    bind_ro: list[Bind]
    bind: list[Bind]
    labels: dict[str, PoolLabel]
    nodes: list[StaticNode]

    def mounts(self, label: str) -> list[tuple[Bind, bool]]:
        """(bind, writable) for a node of `label`: the pool's, then the label's."""
        own = self.labels.get(label)
        return [
            *((b, False) for b in self.bind_ro),
            *((b, True) for b in self.bind),
            *((b, False) for b in (own.bind_ro if own else ())),
            *((b, True) for b in (own.bind if own else ())),
        ]


@dataclass(frozen=True)
class Provider:
    name: str
    driver: str
    pools: list[Pool]


@dataclass
class Config:
    path: Path
    zookeeper_hosts: str  # kazoo connection string, chroot included
    state_dir: Path
    labels: list[str]
    diskimages: list[DiskImage]
    providers: list[Provider]
    zookeeper_tls: TLSFiles | None = None

    def diskimage(self, name: str) -> DiskImage | None:
        return next((d for d in self.diskimages if d.name == name), None)


def _key_path(path: list[Any]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _binds(entries: list[Any]) -> list[Bind]:
    return [
        Bind(e, e) if isinstance(e, str) else Bind(e["host"], e.get("node", e["host"]))
        for e in entries
    ]


def _pool_labels(pool: dict) -> dict[str, PoolLabel]:
    """A static pool offers the labels of its hosts without listing them again."""
    labels = {
        lb["name"]: PoolLabel(
            lb["name"],
            lb.get("diskimage"),
            Limits(lb["memory"], lb["tasks"], lb.get("cpus"), lb["disk"]),
            tuple(_binds(lb["bind-ro"])),
            tuple(_binds(lb["bind"])),
        )
        for lb in pool["labels"]
    }
    for node in pool["nodes"]:
        for name in node["labels"]:
            labels.setdefault(name, PoolLabel(name, None))
    return labels


def _zookeeper_hosts(servers: list[dict]) -> str:
    hosts = ",".join(f"{s['host']}:{s['port']}" for s in servers)
    chroot = next((s["chroot"] for s in servers if s.get("chroot")), "")
    return hosts + ("/" + chroot.strip("/") if chroot.strip("/") else "")


def _check_mount_points(binds: list[Any], where: list[Any]) -> None:
    """One mount per node path: a path both read-only and writable would leave
    which one wins to nspawn's argument order."""
    seen = set()
    for bind in _binds(binds):
        if bind.node in seen:
            raise v.Invalid(f"{bind.node} is mounted twice (pool and label binds)", where)
        seen.add(bind.node)


def _check_references(data: dict) -> None:
    """Names used across sections must exist; raises v.Invalid with a path."""
    labels = {label["name"] for label in data["labels"]}
    images = {image["name"] for image in data["diskimages"]}
    for pi, provider in enumerate(data["providers"]):
        for qi, pool in enumerate(provider["pools"]):
            where = ["providers", pi, "pools", qi]
            for li, label in enumerate(pool["labels"]):
                if label["name"] not in labels:
                    raise v.Invalid(f"unknown label {label['name']!r}", [*where, "labels", li])
                _check_mount_points(
                    [*pool["bind-ro"], *pool["bind"], *label["bind-ro"], *label["bind"]],
                    [*where, "labels", li],
                )
                if provider["driver"] == "nspawn" and label.get("diskimage") not in images:
                    raise v.Invalid(
                        f"unknown diskimage {label.get('diskimage')!r}",
                        [*where, "labels", li, "diskimage"],
                    )
            for ni, node in enumerate(pool["nodes"]):
                for label in node["labels"]:
                    if label not in labels:
                        raise v.Invalid(f"unknown label {label!r}", [*where, "nodes", ni])


def load(path: str | Path) -> Config:
    """Parse and validate `path`; ConfigError (one sentence) on any problem."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}.") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "unknown line"
        raise ConfigError(f"{path}: invalid YAML at {where}.") from None
    try:
        data = SCHEMA(raw)
        _check_references(data)
    except v.MultipleInvalid as error:
        first = error.errors[0]
        raise ConfigError(f"{path}: {_key_path(first.path)}: {first.msg}") from None
    except v.Invalid as error:
        raise ConfigError(f"{path}: {_key_path(error.path)}: {error.msg}") from None
    return Config(
        path=path,
        zookeeper_hosts=_zookeeper_hosts(data["zookeeper-servers"]),
        zookeeper_tls=(
            TLSFiles.from_config(data["zookeeper-tls"], path.parent, f"{path} zookeeper-tls")
            if "zookeeper-tls" in data
            else None
        ),
        state_dir=Path(data["state-dir"]).absolute(),
        labels=[label["name"] for label in data["labels"]],
        diskimages=[
            DiskImage(
                name=d["name"],
                elements=d["elements"],
                release=d["release"],
                rebuild_age=d["rebuild-age"],
                env_vars=d["env-vars"],
                formats=d["formats"],
            )
            for d in data["diskimages"]
        ],
        providers=[
            Provider(
                name=p["name"],
                driver=p["driver"],
                pools=[
                    Pool(
                        name=q["name"],
                        max_servers=q["max-servers"],
                        boot_timeout=q["boot-timeout"],
                        bind_ro=_binds(q["bind-ro"]),
                        bind=_binds(q["bind"]),
                        labels=_pool_labels(q),
                        nodes=[
                            StaticNode(
                                name=n["name"],
                                labels=n["labels"],
                                username=n["username"],
                                connection_port=n["connection-port"],
                                host_key=n.get("host-key"),
                            )
                            for n in q["nodes"]
                        ],
                    )
                    for q in p["pools"]
                ],
            )
            for p in data["providers"]
        ],
    )
