"""The qemu driver: one QEMU VM per node on this host, booted from a
copy-on-write overlay of the provider's copy of a diskimage build."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import voluptuous as v

from nodepool_lite.drivers.base import (
    Driver,
    ImageUploader,
    Provider,
    ProviderConfig,
    local_aliens,
)
from nodepool_lite.drivers.qemu import config
from nodepool_lite.zk import ZooKeeper


class QemuDriver(Driver):
    name = "qemu"

    def schema(self) -> v.Schema:
        return config.SCHEMA

    def load(self, data: dict[str, Any], top: Any) -> ProviderConfig:
        return config.load(data, top)

    def provider(self, cfg: ProviderConfig, state_dir: Path, zk: ZooKeeper) -> Provider:
        from nodepool_lite.drivers.qemu.provider import QemuProvider

        assert isinstance(cfg, config.QemuProviderConfig)
        return QemuProvider(cfg, state_dir, zk)

    def uploader(self, cfg: ProviderConfig) -> ImageUploader | None:
        from nodepool_lite.drivers.qemu.images import ImageStore

        assert isinstance(cfg, config.QemuProviderConfig)
        return ImageStore(cfg.base_dir / "images")

    def alien_servers(
        self, cfg: ProviderConfig, state_dir: Path, known: set[str]
    ) -> list[tuple[str, str]]:
        """VMs of this provider (a QEMU booting an overlay under
        `<base>/nodes/`, or the overlay's directory left) whose node id
        ZooKeeper has no record of: left by a launcher whose node record was
        deleted, or started by hand in our naming. A running launcher
        destroys these as leaked (its cleanup uses the same discovery); this
        only lists them. Other QEMUs of the host are not this provider's."""
        from nodepool_lite.drivers.qemu.provider import qemu_nodes

        assert isinstance(cfg, config.QemuProviderConfig)
        return local_aliens(qemu_nodes, cfg.base_dir / "nodes", known)
