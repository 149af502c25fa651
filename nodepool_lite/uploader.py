"""The builder's uploads of image builds to providers that keep their own
copy (openstack: Glance), recorded in ZooKeeper under
`/nodepool/images/<image>/builds/<id>/providers/<provider>/images/<upload>`.

Each pass uploads the newest ready build of every image a provider's labels
boot from, once, and deletes the uploads of builds being deleted (the
builder's retention marks a build `deleting` and keeps it until its uploads
are gone, so no uploaded image outlives its record). A record is stored
before the provider is touched, so a crash leaves a record to act on.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from nodepool_lite import exceptions as exc
from nodepool_lite.config import Config
from nodepool_lite.drivers import registry
from nodepool_lite.drivers.base import ImageUploader, ProviderConfig
from nodepool_lite.model import BuildState, ImageBuild, ImageUpload, UploadState
from nodepool_lite.worker import BaseWorker
from nodepool_lite.zk import ZooKeeper

log = logging.getLogger("nodepool_lite.uploader")

RETRY_AFTER = 600.0  # seconds before a failed upload is tried again


def uploaders(config: Config) -> dict[str, tuple[ProviderConfig, ImageUploader]]:
    """Provider name -> (its config, its uploader), for drivers that upload."""
    out = {}
    for provider in config.providers:
        driver = registry.get_driver(provider.driver)
        uploader = driver.uploader(provider) if driver else None
        if uploader is not None:
            out[provider.name] = (provider, uploader)
    return out


def _images_of(provider: ProviderConfig) -> set[str]:
    return {label.diskimage for pool in provider.pools for label in pool.labels.values()} - {None}  # type: ignore[return-value]


def upload_pass(zk: ZooKeeper, targets: dict[str, tuple[ProviderConfig, ImageUploader]]) -> None:
    for name, (provider, uploader) in targets.items():
        for image in sorted(_images_of(provider)):
            build = zk.get_most_recent_image_build(image)
            if build is not None and _upload_due(zk, build, name):
                upload(zk, build, name, uploader)
    for image in zk.get_image_names():
        for build in zk.get_image_builds(image, [BuildState.DELETING]):
            for old in zk.get_image_uploads(image, build.id or ""):
                if old.provider in targets:
                    delete_upload(zk, old, targets[old.provider][1])
                else:
                    _forget_upload(zk, old)


def _forget_upload(zk: ZooKeeper, record: ImageUpload) -> None:
    """An upload to a provider no longer configured cannot be deleted from
    it (no credentials, no driver): say what is left there and drop the
    record, so its build can go instead of staying `deleting` forever."""
    log.warning(
        "Upload %s of %s-%s is in provider %s, which is no longer configured: its copy "
        "%s is left there (delete it by hand); forgetting the record",
        record.id, record.image, record.build_id, record.provider,
        record.external_id or record.external_name,
    )  # fmt: skip
    zk.delete_image_upload(record)


def _upload_due(zk: ZooKeeper, build: ImageBuild, provider: str) -> bool:
    uploads = zk.get_image_uploads(build.image, build.id or "", provider)
    if any(u.state in (UploadState.UPLOADING, UploadState.READY) for u in uploads):
        return False
    return all(time.time() - u.state_time > RETRY_AFTER for u in uploads)


def upload(
    zk: ZooKeeper, build: ImageBuild, provider: str, uploader: ImageUploader
) -> ImageUpload:
    record = ImageUpload(image=build.image, build_id=build.id or "", provider=provider)
    record.external_name = f"{build.image}-{build.id}"
    zk.store_image_upload(record)
    path = Path(build.path or "") / f"{build.image}.qcow2"
    try:
        if not path.is_file():
            raise exc.NodepoolError(f"Build {record.external_name} has no qcow2 image ({path}).")
        record.external_id = uploader.upload(
            record.external_name,
            path,
            {
                "nodepool_build_id": record.build_id,
                "nodepool_upload_id": record.id or "",
                "nodepool_provider_name": provider,
            },
        )
        record.state = UploadState.READY
    except (exc.NodepoolError, OSError) as error:
        log.warning("Upload of %s to %s failed: %s", record.external_name, provider, error)
        record.state = UploadState.FAILED
        record.reason = str(error)
    zk.store_image_upload(record)
    return record


def delete_upload(zk: ZooKeeper, record: ImageUpload, uploader: ImageUploader) -> None:
    if record.state != UploadState.DELETING:
        record.state = UploadState.DELETING
        zk.store_image_upload(record)
    if record.external_id:
        uploader.delete(record.external_id)
    zk.delete_image_upload(record)
    log.info("Deleted upload %s of %s-%s", record.id, record.image, record.build_id)


def reconcile_uploads(
    zk: ZooKeeper, targets: dict[str, tuple[ProviderConfig, ImageUploader]]
) -> None:
    """On start: an upload left `uploading` died with its builder (one builder
    uploads for all); it becomes `failed`, and is retried. What such uploads
    left in each provider (a Glance image created before its id was
    recorded, a half copy) is deleted: every copy of ours whose upload is
    not ready or being deleted."""
    kept: dict[str, set[tuple[str, str]]] = {}
    for image in zk.get_image_names():
        for build in zk.get_image_builds(image):
            for record in zk.get_image_uploads(image, build.id or ""):
                if record.state == UploadState.UPLOADING:
                    record.state = UploadState.FAILED
                    record.reason = "the builder stopped during the upload"
                    zk.store_image_upload(record)
                if record.state in (UploadState.READY, UploadState.DELETING) and record.id:
                    kept.setdefault(record.provider, set()).add((record.build_id, record.id))
    for name, (_, uploader) in targets.items():
        try:
            uploader.sweep(kept.get(name, set()))
        except exc.NodepoolError as error:  # the next start looks again
            log.warning("%s", error)


class UploadWorker(BaseWorker):
    """Runs `upload_pass()` on every change of the image builds and on a tick;
    first reconciles what a killed builder left uploading."""

    def __init__(self, config: Config, zk: ZooKeeper, interval: float = 60.0):
        super().__init__(
            "nodepool-builder-upload", threading.Event(), log, interval, first_pass_at_once=True
        )
        self.zk = zk
        self.targets = uploaders(config)

    def run(self) -> None:
        try:
            reconcile_uploads(self.zk, self.targets)
        except exc.NodepoolError:
            log.exception("Reconciling uploads failed")
        super().run()

    def run_once(self) -> None:
        upload_pass(self.zk, self.targets)
