"""The openstack driver: servers of an OpenStack cloud, through openstacksdk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import voluptuous as v

from nodepool_lite.drivers.base import Driver, ImageUploader, Provider, ProviderConfig
from nodepool_lite.drivers.openstack import config
from nodepool_lite.exceptions import NodepoolError
from nodepool_lite.zk import ZooKeeper


class OpenStackDriver(Driver):
    name = "openstack"

    def schema(self) -> v.Schema:
        return config.SCHEMA

    def load(self, data: dict[str, Any], top: Any) -> ProviderConfig:
        return config.load(data, {d["name"]: d["formats"] for d in top["diskimages"]})

    def provider(self, cfg: ProviderConfig, state_dir: Path, zk: ZooKeeper) -> Provider:
        from nodepool_lite.drivers.openstack.provider import OpenStackProvider

        assert isinstance(cfg, config.OpenStackProviderConfig)
        return OpenStackProvider(cfg, state_dir, zk)

    def uploader(self, cfg: ProviderConfig) -> ImageUploader | None:
        from nodepool_lite.drivers.openstack.upload import GlanceUploader

        assert isinstance(cfg, config.OpenStackProviderConfig)
        return GlanceUploader(cfg)

    def alien_servers(
        self, cfg: ProviderConfig, state_dir: Path, known: set[str]
    ) -> list[tuple[str, str]]:
        """Servers of the cloud without this provider's metadata (other users',
        another provider's), and ours whose node ZooKeeper has no record of
        (leaked: the cleanup worker of a running launcher deletes those)."""
        from nodepool_lite.drivers.openstack.provider import (
            CLOUD_ERRORS,
            META_NODE,
            connect,
            is_ours,
        )

        assert isinstance(cfg, config.OpenStackProviderConfig)
        try:
            servers = list(connect(cfg).compute.servers(details=True))
        except CLOUD_ERRORS as error:
            raise NodepoolError(f"Cloud {cfg.cloud}: cannot list servers ({error}).") from None
        return [
            (s.id, s.name)
            for s in servers
            if not is_ours(s, cfg.name) or s.metadata[META_NODE] not in known
        ]
