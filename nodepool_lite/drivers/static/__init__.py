"""The static driver: hosts the operator owns, lent to one request at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import voluptuous as v

from nodepool_lite.drivers.base import Driver, Provider, ProviderConfig
from nodepool_lite.drivers.static import config
from nodepool_lite.zk import ZooKeeper


class StaticDriver(Driver):
    name = "static"

    def schema(self) -> v.Schema:
        return config.SCHEMA

    def load(self, data: dict[str, Any], top: Any) -> ProviderConfig:
        return config.load(data, {label["name"] for label in top["labels"]})

    def provider(self, cfg: ProviderConfig, state_dir: Path, zk: ZooKeeper) -> Provider:
        from nodepool_lite.drivers.static.provider import StaticProvider

        return StaticProvider(cfg, state_dir, zk)
