"""The openstack driver's `providers:` entry, with Nodepool's keys: `cloud`
(an entry of clouds.yaml, found where openstacksdk looks: OS_CLIENT_CONFIG_FILE,
~/.config/openstack/, /etc/openstack/), `region-name`, pools with
`max-servers` and `networks`, labels booted from an uploaded `diskimage` or
an existing `cloud-image`, sized by `flavor-name` or `min-ram`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import voluptuous as v
import yaml

from nodepool_lite.drivers.base import (
    LabelConfig,
    PoolConfig,
    ProviderConfig,
    common_label,
    common_pool,
    common_provider,
)

_label = common_label(
    {
        v.Optional("diskimage"): str,
        v.Optional("cloud-image"): str,
        v.Optional("flavor-name"): str,
        v.Optional("min-ram"): v.All(int, v.Range(min=1)),
        # A keypair of the cloud; by default the launcher's own key is
        # registered as `zuul-lite-<provider>`.
        v.Optional("key-name"): str,
        v.Optional("boot-from-volume", default=False): bool,
        v.Optional("volume-size", default=50): v.All(int, v.Range(min=1)),  # GiB
        v.Optional("username", default="zuul"): str,
        v.Optional("connection-port", default=22): v.All(int, v.Range(min=1, max=65535)),
    }
)
_pool = common_pool(
    _label,
    {
        v.Optional("networks", default=list): [str],  # network ids
        # The pool's own share of the cloud, beside the cloud's quota.
        v.Optional("max-cores"): v.All(int, v.Range(min=1)),
        v.Optional("max-ram"): v.All(int, v.Range(min=1)),  # MiB
    },
)
SCHEMA = v.Schema(
    common_provider(
        _pool,
        {
            v.Required("cloud"): str,
            v.Optional("region-name"): str,
            # From create to an answering sshd; Nodepool's boot-timeout.
            v.Optional("boot-timeout", default=60): v.All(v.Coerce(float), v.Range(min=1)),
        },
    )
)


@dataclass(frozen=True, kw_only=True)
class OpenStackLabel(LabelConfig):
    cloud_image: str | None
    flavor_name: str | None
    min_ram: int | None
    key_name: str | None
    boot_from_volume: bool
    volume_size: int
    username: str
    connection_port: int


@dataclass(frozen=True, kw_only=True)
class OpenStackPool(PoolConfig):
    labels: dict[str, OpenStackLabel]
    networks: list[str]
    max_cores: int | None
    max_ram: int | None


@dataclass(frozen=True, kw_only=True)
class OpenStackProviderConfig(ProviderConfig):
    pools: list[OpenStackPool]  # type: ignore[assignment]
    cloud: str
    region_name: str | None
    boot_timeout: float


def _one_of(label: dict, keys: tuple[str, str], where: list[Any]) -> None:
    if (keys[0] in label) == (keys[1] in label):
        raise v.Invalid(f"give exactly one of {keys[0]} or {keys[1]}", where)


def _broken_clouds_file(files: list[str]) -> str | None:
    """Why the first clouds file openstacksdk would read cannot be read (it
    skips such a file with a log line, and then reports an unknown cloud)."""
    for path in files:
        if os.path.exists(path):
            try:
                with open(path) as f:
                    data = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
            except OSError as error:
                return f"{path}: cannot read: {error.strerror}"
            except (ValueError, yaml.YAMLError) as error:
                mark = getattr(error, "problem_mark", None)
                return f"{path}: invalid YAML" + (f" at line {mark.line + 1}" if mark else "")
            if not isinstance(data, dict) or not isinstance(data.get("clouds"), dict):
                return f"{path}: no clouds: mapping"
            return None
    return None


def check_cloud(cloud: str, region: str | None) -> None:
    """The cloud must be an entry of a readable clouds.yaml (v.Invalid if not)."""
    from openstack import exceptions
    from openstack.config import loader

    files = [*filter(None, [os.environ.get("OS_CLIENT_CONFIG_FILE")]), *loader.CONFIG_FILES]
    broken = _broken_clouds_file(files)
    if broken:
        raise v.Invalid(broken, ["cloud"])
    try:
        loader.OpenStackConfig().get_one(cloud=cloud, region_name=region)
    except exceptions.ConfigException as error:
        found = next((f for f in files if os.path.exists(f)), None)
        where = f"in {found}" if found else "(no clouds.yaml found)"
        reason = str(error).split(". ")[0].rstrip(".")
        raise v.Invalid(f"no cloud {cloud!r} {where} ({reason})", ["cloud"]) from None


def load(data: dict[str, Any], formats: dict[str, list[str]]) -> OpenStackProviderConfig:
    """`formats`: the output formats of each of the file's diskimages; Glance
    gets the qcow2 one."""
    pools = []
    for qi, pool in enumerate(data["pools"]):
        labels = {}
        for li, lb in enumerate(pool["labels"]):
            where = ["pools", qi, "labels", li]
            _one_of(lb, ("diskimage", "cloud-image"), where)
            _one_of(lb, ("flavor-name", "min-ram"), where)
            if "diskimage" in lb and "qcow2" not in formats.get(lb["diskimage"], ["qcow2"]):
                image = lb["diskimage"]
                message = f"diskimage {image} is uploaded to a cloud: add qcow2 to its formats"
                raise v.Invalid(message, [*where, "diskimage"])
            labels[lb["name"]] = OpenStackLabel(
                name=lb["name"],
                diskimage=lb.get("diskimage"),
                cloud_image=lb.get("cloud-image"),
                flavor_name=lb.get("flavor-name"),
                min_ram=lb.get("min-ram"),
                key_name=lb.get("key-name"),
                boot_from_volume=lb["boot-from-volume"],
                volume_size=lb["volume-size"],
                username=lb["username"],
                connection_port=lb["connection-port"],
            )
        pools.append(
            OpenStackPool(
                name=pool["name"],
                max_servers=pool["max-servers"],
                labels=labels,
                networks=pool["networks"],
                max_cores=pool.get("max-cores"),
                max_ram=pool.get("max-ram"),
            )
        )
    check_cloud(data["cloud"], data.get("region-name"))
    return OpenStackProviderConfig(
        name=data["name"],
        driver=data["driver"],
        pools=pools,
        cloud=data["cloud"],
        region_name=data.get("region-name"),
        boot_timeout=data["boot-timeout"],
        launch_retries=data["launch-retries"],
    )
