"""The static driver's `providers:` entry: pools list hosts (`nodes:`) with
the labels each offers; the pool offers its hosts' labels without listing
them again."""

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

_node = {
    v.Required("name"): str,
    v.Required("labels"): [str],
    v.Optional("username", default="zuul"): str,
    v.Optional("connection-port", default=22): int,
    v.Optional("host-key"): str,
}
SCHEMA = v.Schema(
    common_provider(
        common_pool(common_label({}), {v.Optional("nodes", default=list): [_node]}), {}
    )
)


@dataclass(frozen=True)
class StaticNode:
    name: str  # host name or address
    labels: list[str]
    username: str
    connection_port: int
    host_key: str | None


@dataclass(frozen=True, kw_only=True)
class StaticPool(PoolConfig):
    nodes: list[StaticNode]


def load(data: dict[str, Any], declared: set[str]) -> ProviderConfig:
    """`declared`: the labels under the file's top-level `labels:`."""
    pools = []
    for qi, pool in enumerate(data["pools"]):
        for ni, node in enumerate(pool["nodes"]):
            for label in node["labels"]:
                if label not in declared:
                    raise v.Invalid(f"unknown label {label!r}", ["pools", qi, "nodes", ni])
        labels = {lb["name"]: LabelConfig(name=lb["name"]) for lb in pool["labels"]}
        nodes = [
            StaticNode(
                name=n["name"],
                labels=n["labels"],
                username=n["username"],
                connection_port=n["connection-port"],
                host_key=n.get("host-key"),
            )
            for n in pool["nodes"]
        ]
        for node in nodes:
            for name in node.labels:
                labels.setdefault(name, LabelConfig(name=name))
        pools.append(
            StaticPool(
                name=pool["name"], max_servers=pool["max-servers"], labels=labels, nodes=nodes
            )
        )
    return ProviderConfig(
        name=data["name"],
        driver=data["driver"],
        pools=pools,
        launch_retries=data["launch-retries"],
    )
