"""The nspawn driver: throwaway systemd-nspawn containers on this host."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import voluptuous as v

from nodepool_lite.drivers.base import Driver, Provider, ProviderConfig, local_aliens
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

    def alien_servers(
        self, cfg: ProviderConfig, state_dir: Path, known: set[str]
    ) -> list[tuple[str, str]]:
        """Containers (running, or a directory left) under `<state>/nodes/`
        whose node id ZooKeeper has no record of: left by a launcher whose
        node record was deleted, or started by hand in our naming. A running
        launcher destroys these as leaked (its cleanup uses the same
        discovery); this only lists them. Every nspawn provider of one
        state-dir shares `<state>/nodes/` (a node's id is all that names it),
        so a node known to ZooKeeper under any provider is not alien."""
        from nodepool_lite.drivers.nspawn.provider import node_containers

        return local_aliens(node_containers, Path(state_dir) / "nodes", known)
