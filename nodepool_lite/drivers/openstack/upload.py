"""Image builds into Glance (qcow2, bare), for labels booted from a `diskimage`."""

from __future__ import annotations

import logging
from pathlib import Path

from nodepool_lite.drivers.base import ImageUploader
from nodepool_lite.drivers.openstack.config import OpenStackProviderConfig
from nodepool_lite.drivers.openstack.provider import CLOUD_ERRORS, connect
from nodepool_lite.exceptions import NodepoolError

log = logging.getLogger("nodepool_lite.drivers.openstack.upload")

UPLOAD_TIMEOUT = 3600.0


class GlanceUploader(ImageUploader):
    def __init__(self, provider: OpenStackProviderConfig):
        self.provider = provider

    def upload(self, name: str, path: Path, meta: dict[str, str]) -> str:
        conn = connect(self.provider)
        try:
            image = conn.image.create_image(
                name,
                filename=str(path),
                disk_format="qcow2",
                container_format="bare",
                meta=meta,
                allow_duplicates=True,  # a retried upload must not adopt a half one
                wait=True,
                timeout=UPLOAD_TIMEOUT,
            )
        except CLOUD_ERRORS as error:
            raise NodepoolError(
                f"Upload of {name} to {self.provider.name} failed: {error}"
            ) from None
        log.info("Uploaded %s to %s as image %s", name, self.provider.name, image.id)
        return image.id

    def delete(self, external_id: str) -> None:
        conn = connect(self.provider)
        try:
            conn.image.delete_image(external_id, ignore_missing=True)
        except CLOUD_ERRORS as error:
            raise NodepoolError(
                f"Deleting image {external_id} from {self.provider.name} failed: {error}"
            ) from None

    def sweep(self, kept: set[tuple[str, str]]) -> list[str]:
        """Glance images carrying this provider's name in their metadata."""
        conn = connect(self.provider)
        swept = []
        try:
            for image in conn.image.images():
                props = getattr(image, "properties", None) or {}
                key = (props.get("nodepool_build_id"), props.get("nodepool_upload_id"))
                if props.get("nodepool_provider_name") != self.provider.name or None in key:
                    continue
                if key not in kept:
                    log.warning(
                        "Deleting image %s (%s) from %s: upload %s of build %s is not a kept "
                        "one (its builder stopped during the upload)",
                        image.id, image.name, self.provider.name, key[1], key[0],
                    )  # fmt: skip
                    conn.image.delete_image(image.id, ignore_missing=True)
                    swept.append(image.id)
        except CLOUD_ERRORS as error:
            raise NodepoolError(
                f"Looking for leaked images in {self.provider.name} failed: {error}"
            ) from None
        return swept
