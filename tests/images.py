"""The node image for tests, built at most once per machine per elements/ content.

A real build takes minutes, so every test that needs nodes (builder, nodepool
launcher, end to end) shares one: `ensure_node_image()` keeps builds under
`<cache>/images/<image>-<key>/` (`<cache>` is /var/cache/zuul-lite or
$ZUUL_LITE_CACHE), where `key` hashes the image's elements in elements/ and
the diskimage's config. A changed element of the image means a new key, hence
a new real build; an unchanged one means the cached rootfs is registered in
the test's ZooKeeper as a `ready` build of its own and returned at once.

An image with the kernel-tree-cache element holds the tree
`kerneltree.ensure_kernel_repo()` imports, built (the one cold kernel build
of a test run, reading the machine's shared compiler cache): its base sha is
part of the key, so a new Debian kernel package means a new build.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import diskimage_builder
from diskimage_builder.element_dependencies import get_elements

from nodepool_lite import config as nodepool_config
from nodepool_lite.builder import (
    DEFAULT_DIB_ENV,
    REPO_ELEMENTS,
    Progress,
    build_image,
    cache_root,
    dib_command,
    get_diskimage,
)
from nodepool_lite.config import Config, DiskImage
from nodepool_lite.model import BuildState, ImageBuild
from nodepool_lite.zk import ZooKeeper
from zuul_lite import kerneltree

MARKER = "ready.json"
KEY_LENGTH = 16
EXAMPLE_CONFIG = Path(__file__).resolve().parent.parent / "etc" / "nodepool.yaml"
TREE_ELEMENT = "kernel-tree-cache"
# Where the test image's build reads compiler objects: the cache the e2e nodes use.
TREE_CCACHE = "ccache-nodes"


def node_config(state_dir: Path) -> Config:
    """etc/nodepool.yaml (which defines kernel-ci-debian) with its state dir
    moved and no metrics server (its fixed ports would clash between runs)."""
    return dataclasses.replace(
        nodepool_config.load(EXAMPLE_CONFIG),
        state_dir=Path(state_dir),
        metrics_launcher_port=None,
        metrics_builder_port=None,
    )


def own_elements(diskimage: DiskImage) -> list[Path]:
    """The directories of elements/ the image is built from (its elements and
    their dependencies): a change to another element is no reason to rebuild it."""
    dib_elements = Path(diskimage_builder.__file__).parent / "elements"
    extra = diskimage.env_vars.get("ELEMENTS_PATH")
    paths = ":".join(filter(None, [str(REPO_ELEMENTS), extra, str(dib_elements)]))
    expanded = get_elements(diskimage.elements, paths)
    return sorted(Path(path) for _, path in expanded if Path(path).parent == REPO_ELEMENTS)


def with_kernel_tree(diskimage: DiskImage) -> DiskImage:
    """`diskimage` pointed at the tests' kernel tree (the project `linux` of the
    quick start and the e2e tests) if it has the kernel-tree-cache element."""
    if not any(path.name == TREE_ELEMENT for path in own_elements(diskimage)):
        return diskimage
    env = {
        **diskimage.env_vars,
        "DIB_KERNEL_TREE_REPO": str(kerneltree.ensure_kernel_repo()),
        "DIB_KERNEL_TREE_REF": kerneltree.BRANCH,
        "DIB_KERNEL_TREE_PROJECT": "linux",
        "DIB_KERNEL_TREE_CCACHE": str(cache_root() / TREE_CCACHE),
    }
    return dataclasses.replace(diskimage, env_vars=env)


def _tree_base(diskimage: DiskImage) -> str:
    """The commit the image's kernel tree is built at, or "" without one."""
    repo = diskimage.env_vars.get("DIB_KERNEL_TREE_REPO")
    if not repo:
        return ""
    ref = diskimage.env_vars.get("DIB_KERNEL_TREE_REF", kerneltree.BRANCH)
    return subprocess.run(
        ["git", "-C", repo, "rev-parse", "--verify", f"{ref}^{{commit}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def image_key(diskimage: DiskImage) -> str:
    """Hash of what decides the image's content: every file of its elements in
    elements/ but the docs (path, exec bit, bytes), the diskimage's config, the
    builder's dib flags and env, and the base commit of its kernel tree (not
    the compiler cache it reads: that only saves time)."""
    diskimage = with_kernel_tree(diskimage)
    env = {k: v for k, v in diskimage.env_vars.items() if k != "DIB_KERNEL_TREE_CCACHE"}
    digest = hashlib.sha256()
    settings = [
        diskimage.elements,
        diskimage.release,
        sorted(env.items()),
        _tree_base(diskimage),
        dib_command(diskimage, Path("OUT"))[1:],
        sorted(DEFAULT_DIB_ENV.items()),
    ]
    digest.update(json.dumps(settings).encode())
    for path in sorted(p for element in own_elements(diskimage) for p in element.rglob("*")):
        if path.is_file() and path.suffix != ".rst" and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(REPO_ELEMENTS)).encode())
            digest.update(b"x" if path.stat().st_mode & 0o111 else b"-")
            digest.update(path.read_bytes())
    return digest.hexdigest()[:KEY_LENGTH]


def prune_stale(current: Path, unused_for: float = 86400) -> None:
    """Drop cached builds of the same image for other elements/ trees once unused
    for a day and not mounted: a test run of an older checkout may still boot
    nodes (overlays with the rootfs as lower dir) from them."""
    image = current.name.rsplit("-", 1)[0]
    mounts = Path("/proc/mounts").read_text()
    for slot in current.parent.glob(f"{image}-{'?' * KEY_LENGTH}"):
        marker = slot / MARKER
        stale = not marker.exists() or time.time() - marker.stat().st_mtime > unused_for
        if slot != current and stale and str(slot) not in mounts:
            shutil.rmtree(slot, ignore_errors=True)


def ensure_node_image(
    zk: ZooKeeper,
    config: Config,
    image_name: str = "kernel-ci-debian",
    progress: Progress | None = None,
) -> ImageBuild:
    """A `ready` ImageBuild of `image_name` stored in `zk`, its `path` in the
    machine-wide cache (rootfs at `<path>/rootfs`). Builds with disk-image-create
    only when no cached build matches; concurrent callers (other pytest runs)
    wait for the one that builds."""
    diskimage = get_diskimage(config, image_name)
    slot = cache_root() / "images" / f"{image_name}-{image_key(diskimage)}"
    slot.parent.mkdir(parents=True, exist_ok=True)
    with open(slot.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        marker = slot / MARKER
        prune_stale(slot)
        if not marker.exists():
            shutil.rmtree(slot, ignore_errors=True)  # a build that died half-way
            slot.mkdir()
            tree = with_kernel_tree(diskimage)
            config = dataclasses.replace(
                config,
                diskimages=[tree if d is diskimage else d for d in config.diskimages],
            )
            build = build_image(config, zk, image_name, progress, output_dir=slot)
            if build.state != BuildState.READY:
                raise RuntimeError(f"The test image build failed; see {build.log_path}.")
            marker.write_text(json.dumps(build.to_dict(), indent=2))
            return build
        marker.touch()  # last use, for prune_stale()
        data = json.loads(marker.read_text())
    data.pop("id")
    # Registered now: a builder daemon in the test must not find it past rebuild-age.
    data["created_time"] = data["state_time"] = time.time()
    build = ImageBuild.from_dict(data)
    zk.store_image_build(image_name, build)
    return build


def prebuild(zk: ZooKeeper, images: list[str], state_dir: Path) -> None:
    """Fill the cache with `images` (each built only if cold), one after the other."""
    from tests.qemu_env import VM_IMAGE, write_qemu_config

    for name in images:
        if name == VM_IMAGE:
            config = nodepool_config.load(write_qemu_config(state_dir, zk.hosts))
        else:
            config = node_config(state_dir)
        ensure_node_image(zk, config, name)


def main() -> None:
    """`python -m tests.images ZK_HOSTS STATE_DIR IMAGE...`: the session's
    prebuild (tests/conftest.py). SIGTERM ends it as a failed build does: dib's
    processes killed, its mounts released, the half-built slot left for the
    next caller to clear."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    hosts, state_dir, *images = sys.argv[1:]
    zk = ZooKeeper(hosts)
    zk.connect()
    try:
        prebuild(zk, images, Path(state_dir))
    finally:
        zk.disconnect()


if __name__ == "__main__":
    main()
