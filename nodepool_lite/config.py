"""Load and validate `nodepool.yaml` (format in doc/architecture.md).

The voluptuous schema sits next to the loader so a key is described once.
Every error is one sentence naming the file and the key path, e.g.
"etc/nodepool.yaml: providers[0].pools[0].max-servers: expected int", because
operators fix configs from that line alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import voluptuous as v
import yaml

from nodepool_lite import tls
from nodepool_lite.drivers import registry
from nodepool_lite.drivers.base import ProviderConfig
from nodepool_lite.exceptions import ConfigError
from nodepool_lite.tls import TLSFiles

DEFAULT_STATE_DIR = "/var/lib/zuul-lite"

_zk_server = {
    v.Required("host"): str,
    v.Optional("port", default=2181): int,
    v.Optional("chroot"): str,
}
_label = {
    v.Required("name"): str,
    # Ready nodes of the label kept booted and unallocated (min_ready.py).
    v.Optional("min-ready", default=0): v.All(int, v.Range(min=0)),
}
_diskimage = {
    v.Required("name"): str,
    v.Required("elements"): [str],
    v.Optional("release", default="bookworm"): str,
    v.Optional("rebuild-age", default=86400): int,
    v.Optional("env-vars", default=dict): {str: v.Coerce(str)},
    v.Optional("formats", default=lambda: ["tar"]): [str],
}
# Only what every driver has; the rest of an entry is the driver's schema
# (drivers/<name>/config.py), checked once its driver is known.
_provider = {v.Required("name"): str, v.Required("driver"): str, v.Extra: object}
SCHEMA = v.Schema(
    {
        v.Optional("zookeeper-servers", default=lambda: [{"host": "127.0.0.1"}]): [_zk_server],
        # Nodepool's key: the client certificate; without it ZooKeeper is plain TCP.
        v.Optional("zookeeper-tls"): tls.SCHEMA,
        v.Optional("state-dir", default=DEFAULT_STATE_DIR): str,
        v.Optional("labels", default=list): [_label],
        v.Optional("diskimages", default=list): [_diskimage],
        v.Optional("providers", default=list): [_provider],
        # Prometheus /metrics of the launcher and the builder (nodepool_lite/metrics.py).
        v.Optional("metrics"): {
            v.Optional("listen", default="127.0.0.1"): str,
            v.Optional("launcher-port"): v.All(int, v.Range(min=0, max=65535)),
            v.Optional("builder-port"): v.All(int, v.Range(min=0, max=65535)),
        },
    }
)


@dataclass(frozen=True)
class DiskImage:
    name: str
    elements: list[str]
    release: str
    rebuild_age: int
    env_vars: dict[str, str]
    formats: list[str]


@dataclass
class Config:
    path: Path
    zookeeper_hosts: str  # kazoo connection string, chroot included
    state_dir: Path
    labels: list[str]
    diskimages: list[DiskImage]
    providers: list[ProviderConfig]
    zookeeper_tls: TLSFiles | None = None
    min_ready: dict[str, int] = field(default_factory=dict)  # labels with min-ready > 0
    metrics_listen: str = "127.0.0.1"
    metrics_launcher_port: int | None = None  # None: no /metrics
    metrics_builder_port: int | None = None

    def diskimage(self, name: str) -> DiskImage | None:
        return next((d for d in self.diskimages if d.name == name), None)


def _key_path(path: list[Any]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _zookeeper_hosts(servers: list[dict]) -> str:
    hosts = ",".join(f"{s['host']}:{s['port']}" for s in servers)
    chroot = next((s["chroot"] for s in servers if s.get("chroot")), "")
    return hosts + ("/" + chroot.strip("/") if chroot.strip("/") else "")


def _check_labels(data: dict, where: list[Any]) -> None:
    """A pool's labels must be declared, and the images they boot defined;
    raises v.Invalid with a path."""
    labels = {label["name"] for label in data["labels"]}
    images = {image["name"] for image in data["diskimages"]}
    provider = data["providers"][where[-1]]
    for qi, pool in enumerate(provider.get("pools", [])):
        for li, label in enumerate(pool.get("labels", [])):
            at = [*where, "pools", qi, "labels", li]
            if label["name"] not in labels:
                raise v.Invalid(f"unknown label {label['name']!r}", at)
            if "diskimage" in label and label["diskimage"] not in images:
                raise v.Invalid(f"unknown diskimage {label['diskimage']!r}", [*at, "diskimage"])


def _load_provider(data: dict, index: int) -> ProviderConfig:
    """Entry `index` of `providers:`, by its driver's schema and loader."""
    where: list[Any] = ["providers", index]
    entry = data["providers"][index]
    driver = registry.get_driver(entry["driver"])
    if driver is None:
        raise v.Invalid(f"expected one of {', '.join(registry.names())}", [*where, "driver"])
    try:
        data["providers"][index] = entry = driver.schema()(entry)
    except v.MultipleInvalid as error:
        first = error.errors[0]
        if first.error_message == "extra keys not allowed":
            raise v.Invalid(
                f"not a key of the {driver.name} driver", [*where, *first.path]
            ) from None
        raise v.Invalid(first.msg, [*where, *first.path]) from None
    _check_labels(data, where)
    try:
        return driver.load(entry, data)
    except v.Invalid as error:
        raise v.Invalid(error.msg, [*where, *error.path]) from None


def _check_min_ready(data: dict, providers: list[ProviderConfig]) -> None:
    """Ready nodes of a label no pool offers could never be made: say so
    rather than fail a request for them forever."""
    offered = {label for p in providers for pool in p.pools for label in pool.labels}
    for i, label in enumerate(data["labels"]):
        if label["min-ready"] and label["name"] not in offered:
            raise v.Invalid(
                f"no provider pool offers label {label['name']!r}", ["labels", i, "min-ready"]
            )


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
        providers = [_load_provider(data, i) for i in range(len(data["providers"]))]
        _check_min_ready(data, providers)
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
        min_ready={lb["name"]: lb["min-ready"] for lb in data["labels"] if lb["min-ready"]},
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
        providers=providers,
        metrics_listen=data.get("metrics", {}).get("listen", "127.0.0.1"),
        metrics_launcher_port=data.get("metrics", {}).get("launcher-port"),
        metrics_builder_port=data.get("metrics", {}).get("builder-port"),
    )
