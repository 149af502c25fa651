"""The nspawn driver: throwaway systemd-nspawn containers on this host."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import voluptuous as v

from nodepool_lite.drivers.base import Driver, Provider, ProviderConfig
from nodepool_lite.drivers.nspawn import config
from nodepool_lite.zk import ZooKeeper


class NspawnDriver(Driver):
    name = "nspawn"

    def schema(self) -> v.Schema:
        return config.SCHEMA

    def load(self, data: dict[str, Any], top: Any) -> ProviderConfig:
        return config.load(data)

    def provider(self, cfg: ProviderConfig, state_dir: Path, zk: ZooKeeper) -> Provider:
        from nodepool_lite.drivers.nspawn.provider import NspawnProvider

        return NspawnProvider(cfg, state_dir, zk)
