"""The qemu provider's own copy of each image build it boots (the "upload"):
`<base>/images/<image>-<build id>/` with the build's qcow2 as `disk.qcow2`
and the kernel and initrd the image installed (from the build's extracted
rootfs/boot). Nodes boot that kernel with `root=/dev/vda`: the build is a
partitionless filesystem image, which is all diskimage-builder makes here.

A copy, not a reference, so the builder's retention of builds never pulls
an image from under a node; the upload worker deletes a copy once its build
expires (and the builder keeps builds that nodes still boot from)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from nodepool_lite.drivers.base import ImageUploader
from nodepool_lite.exceptions import NodepoolError

log = logging.getLogger("nodepool_lite.drivers.qemu.images")

DISK = "disk.qcow2"
META = "upload.json"  # the upload's metadata: nodepool_upload_id, build and provider
KERNEL = "vmlinuz"
INITRD = "initrd.img"


@dataclass(frozen=True)
class StoredImage:
    disk: Path
    kernel: Path
    initrd: Path


def _version_key(path: Path) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path.name)]


def boot_files(rootfs: Path) -> tuple[Path, Path]:
    """The newest kernel of an image's rootfs and its initrd."""
    kernels = sorted((rootfs / "boot").glob("vmlinuz-*"), key=_version_key)
    for kernel in reversed(kernels):
        initrd = rootfs / "boot" / f"initrd.img-{kernel.name.removeprefix('vmlinuz-')}"
        if initrd.is_file():
            return kernel, initrd
    raise NodepoolError(
        f"{rootfs}/boot has no kernel with an initrd: build the image with the vm-node element."
    )


class ImageStore(ImageUploader):
    def __init__(self, images_dir: Path):
        self.images_dir = Path(images_dir)

    def image(self, external_id: str) -> StoredImage | None:
        path = self.images_dir / external_id
        stored = StoredImage(path / DISK, path / KERNEL, path / INITRD)
        return (
            stored
            if all(p.is_file() for p in (stored.disk, stored.kernel, stored.initrd))
            else None
        )

    def upload(self, name: str, path: Path, meta: dict[str, str]) -> str:
        kernel, initrd = boot_files(path.parent / "rootfs")
        self.images_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.images_dir / f".{name}.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            for source, target in ((path, DISK), (kernel, KERNEL), (initrd, INITRD)):
                shutil.copyfile(source, tmp / target)
            (tmp / DISK).chmod(0o444)  # a base image: nodes write only to overlays
            (tmp / META).write_text(json.dumps(meta))  # which upload made it (see sweep)
            shutil.rmtree(self.images_dir / name, ignore_errors=True)  # a retried upload
            tmp.rename(self.images_dir / name)
        except OSError as error:
            shutil.rmtree(tmp, ignore_errors=True)
            raise NodepoolError(f"Copying {name} to {self.images_dir} failed: {error}") from None
        log.info("Stored %s in %s (kernel %s)", name, self.images_dir, kernel.name)
        return name

    def delete(self, external_id: str) -> None:
        shutil.rmtree(self.images_dir / external_id, ignore_errors=True)

    def sweep(self, kept: set[tuple[str, str]]) -> list[str]:
        """Copies half made (`.<name>.<pid>`, never renamed into place) and
        whole ones whose upload is not kept (the builder stopped before it
        recorded them); a copy without META (stored before it was written)
        is left alone: nothing says whose it is."""
        if not self.images_dir.is_dir():
            return []
        swept = []
        for path in sorted(self.images_dir.iterdir()):
            if not path.is_dir():
                continue
            if not path.name.startswith("."):
                try:
                    meta = json.loads((path / META).read_text())
                    key = (meta["nodepool_build_id"], meta["nodepool_upload_id"])
                except (OSError, ValueError, TypeError, KeyError):
                    continue
                if key in kept:
                    continue
            log.warning("Deleting %s: left by an upload that did not finish", path)
            shutil.rmtree(path, ignore_errors=True)
            swept.append(path.name)
        return swept
