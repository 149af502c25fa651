"""The nodepool builder: diskimage-builder runs that turn `diskimages:` into node rootfs dirs.

One build is one `disk-image-create -t tar` subprocess, recorded in ZooKeeper
before it starts (state `building`) so that `nodepool dib-image-list` shows it
and a restarted builder can fail what it left behind. Its output lives in
`<images dir>/<image>-<build id>/`:

    build.log     everything disk-image-create printed
    <image>.tar   the partitionless image diskimage-builder made
    rootfs/       the tar extracted (numeric owners, xattrs): what nodes boot

The daemon (`NodePoolBuilder`) runs the Nodepool threads: a BuildWorker that
builds on request (`nodepool image-build`) and when the newest ready build is
older than `rebuild-age`, a CleanupWorker that keeps the newest
`KEEP_READY` ready builds, and an UploadWorker (uploader.py) that uploads
builds to providers keeping their own copy (openstack). `build_image()` is
the same build, synchronous, for `nodepool image-build --wait` and the tests.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import selectors
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO

from prometheus_client import CollectorRegistry

from nodepool_lite import dib_orphans
from nodepool_lite import exceptions as exc
from nodepool_lite.config import Config, DiskImage
from nodepool_lite.drivers.userns import shift_rootfs
from nodepool_lite.metrics import BuilderMetrics, MetricsServer, StateCollector
from nodepool_lite.model import BuildState, ImageBuild
from nodepool_lite.uploader import UploadWorker, uploaders
from nodepool_lite.worker import BaseWorker
from nodepool_lite.zk import IMAGE_BUILD_REQUEST_ROOT, IMAGE_ROOT, ZooKeeper

log = logging.getLogger("nodepool_lite.builder")

REPO_ELEMENTS = Path(__file__).resolve().parent.parent / "elements"
KEEP_READY = 2
# Mirrors that answer on these hosts (security.debian.org does not); config wins.
DEFAULT_DIB_ENV = {
    "DIB_DEBIAN_MIRROR": "http://deb.debian.org/debian",
    "DIB_DEBIAN_SECURITY_MIRROR": "http://deb.debian.org/debian-security",
    # Reuse the debootstrap result across builds: dist-upgrade still runs after it.
    "DIB_DEBOOTSTRAP_CACHE": "1",
    "DIB_DEBIAN_USE_DEBOOTSTRAP_CACHE": "1",
}

Progress = Callable[[str], None]


def cache_root() -> Path:
    """The machine-wide cache shared by every state dir (architecture.md)."""
    return Path(os.environ.get("ZUUL_LITE_CACHE", "/var/cache/zuul-lite"))


def images_dir(config: Config) -> Path:
    return Path(config.state_dir) / "images"


def get_diskimage(config: Config, image_name: str) -> DiskImage:
    """The `diskimages:` entry named `image_name`; a user error if there is none."""
    diskimage = config.diskimage(image_name)
    if diskimage is None:
        raise exc.ConfigError(
            f"Unknown image {image_name!r}: no such entry under diskimages in nodepool.yaml."
        )
    return diskimage


def _dib_elements() -> Path | None:
    """diskimage-builder's own elements (debian-minimal, base, ...)."""
    spec = importlib.util.find_spec("diskimage_builder")
    return Path(spec.origin).parent / "elements" if spec and spec.origin else None


def check_elements(config: Config, diskimage: DiskImage) -> None:
    """Every element of `diskimage` exists where dib will look (elements/, the
    image's ELEMENTS_PATH, diskimage-builder's own); ConfigError naming the
    key otherwise, before any build record or dib run."""
    extra = diskimage.env_vars.get("ELEMENTS_PATH", "")
    dirs = [REPO_ELEMENTS, *(Path(p) for p in extra.split(":") if p), _dib_elements()]
    index = config.diskimages.index(diskimage)
    for i, element in enumerate(diskimage.elements):
        if not any(d is not None and (d / element).is_dir() for d in dirs):
            raise exc.ConfigError(
                f"{config.path}: diskimages[{index}].elements[{i}]: unknown element "
                f"{element!r} (not in elements/, ELEMENTS_PATH or diskimage-builder's)."
            )


def image_names(config: Config) -> list[str]:
    return [d.name for d in config.diskimages]


def rootfs_path(build: ImageBuild) -> Path:
    """Where nodes of `build` find their root filesystem."""
    return Path(build.path) / "rootfs"


def dib_env(diskimage: DiskImage) -> dict[str, str]:
    """The environment of disk-image-create: our elements first, mirrors, caches,
    then the image's `env-vars` (which may override any of these)."""
    env = dict(os.environ)
    venv_bin = str(Path(sys.executable).parent)
    # disk-image-create calls its helpers (dib-run-parts, element-info) by name.
    env["PATH"] = f"{venv_bin}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
    env.update(DEFAULT_DIB_ENV)
    env["DIB_IMAGE_CACHE"] = str(cache_root() / "dib")
    env["DIB_RELEASE"] = diskimage.release
    env.update({k: str(v) for k, v in diskimage.env_vars.items()})
    extra = diskimage.env_vars.get("ELEMENTS_PATH")
    env["ELEMENTS_PATH"] = f"{REPO_ELEMENTS}:{extra}" if extra else str(REPO_ELEMENTS)
    env.setdefault("DIB_DISTRIBUTION_MIRROR", env["DIB_DEBIAN_MIRROR"])
    return env


def formats(diskimage: DiskImage) -> list[str]:
    """dib output types: always `tar`, the one nodes boot from (once extracted)."""
    return ["tar", *(f for f in diskimage.formats if f != "tar")]


def dib_command(diskimage: DiskImage, output: Path) -> list[str]:
    """`-n` leaves out dib's implicit `base` element: it adds open-iscsi,
    software-properties-common and cloud-init settings (20 s per build), none of
    which a container node uses. Images that want it list `base` in elements."""
    venv_dib = Path(sys.executable).parent / "disk-image-create"
    dib = str(venv_dib) if venv_dib.exists() else shutil.which("disk-image-create")
    if dib is None:
        raise exc.NodepoolError(
            "disk-image-create is not installed (pip install diskimage-builder)."
        )
    return [dib, "-n", "-t", ",".join(formats(diskimage)), "-o", str(output), *diskimage.elements]


def dib_lock_path() -> Path:
    return cache_root() / "dib" / ".disk-image-create.lock"


@contextmanager
def machine_lock() -> Iterator[None]:
    """One dib run per machine: concurrent runs would share (and lock) the apt cache
    bind-mounted from DIB_IMAGE_CACHE, and compete for the same two cores."""
    path = dib_lock_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class BuildRun:
    """One running disk-image-create; `cancel()` from another thread kills it."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.build_dir: Path | None = None
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()
        if self.process is not None and self.process.poll() is None and self.build_dir:
            # dib starts sudo/chroot children, some in sessions of their own:
            # kill every process of the build while its tree is still whole.
            dib_orphans.kill_build(self.build_dir)

    def run(
        self,
        cmd: list[str],
        env: dict[str, str],
        build_dir: Path,
        log_path: Path,
        progress: Progress | None,
    ) -> int:
        """Run `cmd` for the build in `build_dir`, its output to `log_path`
        (and `progress`); return its exit code."""
        self.build_dir = build_dir
        with open(log_path, "ab") as out:
            out.write(f"$ {' '.join(cmd)}\n".encode())
            out.flush()
            self.process = subprocess.Popen(
                cmd,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            if self.cancelled.is_set():
                self.cancel()
            self._copy_output(out, progress)
            return self.process.wait()

    def _copy_output(self, out: BinaryIO, progress: Progress | None) -> None:
        """Copy dib's output until it exits and every process it left holding
        the pipe is killed: a child forked as dib was killed (cancel), or one
        it left running, must not keep the build from ending."""
        assert self.process is not None and self.process.stdout is not None
        assert self.build_dir is not None
        pipe = self.process.stdout.fileno()
        pidfd = os.pidfd_open(self.process.pid)
        pending = b""
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(pipe, selectors.EVENT_READ)
                selector.register(pidfd, selectors.EVENT_READ)
                drain_until = None
                while True:
                    wait = None if drain_until is None else drain_until - time.monotonic()
                    ready = selector.select(wait) if wait is None or wait > 0 else []
                    if not ready:
                        return  # a writer outlived the kill (stuck): stop waiting for it
                    for key, _ in ready:
                        if key.fd == pidfd:
                            selector.unregister(pidfd)
                            dib_orphans.kill_build(self.build_dir)
                            drain_until = time.monotonic() + 10
                            continue
                        data = os.read(pipe, 65536)
                        if not data:
                            if pending:
                                self._emit(out, progress, pending)
                            return
                        *lines, pending = (pending + data).split(b"\n")
                        for line in lines:
                            self._emit(out, progress, line + b"\n")
        finally:
            os.close(pidfd)

    @staticmethod
    def _emit(out: BinaryIO, progress: Progress | None, line: bytes) -> None:
        out.write(line)
        if progress is not None:
            progress(line.decode(errors="replace").rstrip("\n"))


def extract(tarball: Path, rootfs: Path) -> None:
    """Unpack a dib tar as nodes need it: owners by number (the image's uids, not
    the host's names), permissions, xattrs (file capabilities such as ping's)."""
    rootfs.mkdir()
    result = subprocess.run(
        [
            "tar", "--numeric-owner", "--same-permissions", "--xattrs",
            "--xattrs-include=*", "-xf", str(tarball), "-C", str(rootfs),
        ],
        capture_output=True,
        text=True,
    )  # fmt: skip
    if result.returncode != 0:
        raise exc.NodepoolError(f"Extracting {tarball} failed: {result.stderr.strip()}")


def build_image(
    config: Config,
    zk: ZooKeeper,
    image_name: str,
    progress: Progress | None = None,
    *,
    output_dir: Path | None = None,
    run: BuildRun | None = None,
) -> ImageBuild:
    """Build `image_name` now and return its ImageBuild (`ready` or `failed`).

    `output_dir` replaces `<state>/images` (the tests' machine-wide image cache);
    `run` lets a daemon thread cancel the build on stop.
    """
    diskimage = get_diskimage(config, image_name)
    check_elements(config, diskimage)
    base = output_dir or images_dir(config)
    build = ImageBuild(
        builder=socket.gethostname(),
        formats=formats(diskimage),
        elements=list(diskimage.elements),
    )
    zk.store_image_build(image_name, build)
    build_dir = base / f"{image_name}-{build.id}"
    build.path = str(build_dir)
    build.log_path = str(build_dir / "build.log")
    zk.store_image_build(image_name, build)
    blog = log.getChild(f"{image_name}-{build.id}")
    blog.info("Building %s with elements %s", build_dir, " ".join(diskimage.elements))
    start = time.monotonic()
    try:
        tmp = dib_orphans.tmp_dir(build_dir)
        tmp.mkdir(parents=True)
        # Everything dib makes (its build dirs, the chroot and its mounts,
        # the temporary files of its scripts: TMPDIR, which mktemp reads)
        # lies under the build dir, where a restarted builder finds it.
        env = {**dib_env(diskimage), "TMP_DIR": str(tmp), "TMPDIR": str(tmp)}
        cmd = dib_command(diskimage, build_dir / image_name)
        with machine_lock():
            try:
                rc = (run or BuildRun()).run(cmd, env, build_dir, Path(build.log_path), progress)
            finally:
                _end_run(build_dir)
        if rc != 0:
            raise exc.NodepoolError(f"disk-image-create exited with {rc}; see {build.log_path}.")
        built = time.monotonic()
        extract(build_dir / f"{image_name}.tar", build_dir / "rootfs")
        shift_rootfs(build_dir / "rootfs")  # nodes boot from it at once, none pays this
        took = time.monotonic() - built
        timing = f"built in {built - start:.0f} s, extracted for nodes in {took:.1f} s"
        blog.info("Ready: %s", timing)
        with open(build.log_path, "a") as out:
            out.write(f"zuul-lite builder: {timing}\n")
        build.state = BuildState.READY
    except (OSError, exc.NodepoolError) as e:
        blog.error("Build failed: %s", e)
        with suppress(OSError), open(build.log_path, "a") as out:
            out.write(f"zuul-lite builder: build failed: {e}\n")
        # Keep only the log: a partial tar or rootfs must never look usable.
        shutil.rmtree(build_dir / "rootfs", ignore_errors=True)
        (build_dir / f"{image_name}.tar").unlink(missing_ok=True)
        build.state = BuildState.FAILED
    zk.store_image_build(image_name, build)
    return build


def _end_run(build_dir: Path) -> None:
    """After a dib run, ended or orphaned: no process of it left, then nothing
    mounted below its TMP_DIR (a mount left there may bind a cache that
    rmtree would empty), then the dir itself."""
    dib_orphans.kill_build(build_dir)
    tmp = dib_orphans.tmp_dir(build_dir)
    dib_orphans.release_mounts(tmp)
    shutil.rmtree(tmp, ignore_errors=True)


def remove_build(config: Config, zk: ZooKeeper, build: ImageBuild) -> None:
    """Delete a build: record `deleting`, its dir if it is ours, then the record.

    Dirs outside `<state>/images` (the tests' shared image cache) are left alone:
    other state dirs may point at them."""
    build.state = BuildState.DELETING
    zk.store_image_build(build.image, build)
    if build.path and Path(build.path).parent == images_dir(config):
        shutil.rmtree(build.path, ignore_errors=True)
    zk.delete_image_build(build.image, build.id)
    log.info("Deleted image build %s-%s", build.image, build.id)


def _build_key(build: ImageBuild) -> str:
    return f"{build.image}-{build.id}"


def all_builds(config: Config, zk: ZooKeeper) -> list[ImageBuild]:
    """Builds of every image in ZooKeeper or in the config, oldest first per image."""
    names = sorted(set(zk.get_image_names()) | set(image_names(config)))
    return [b for name in names for b in zk.get_image_builds(name)]


def machine_building() -> bool:
    """True while some process on this machine runs disk-image-create."""
    path = dib_lock_path()
    if not path.exists():
        return False
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def reconcile(config: Config, zk: ZooKeeper) -> None:
    """After a builder restart: builds this host left `building` are dead ones
    (unless a CLI build runs right now). Their orphaned dib processes are
    killed and their mounts and loop devices released before anything else,
    so no second dib ever runs beside an orphan; then each is marked failed
    (its partial output dropped, its log kept) and built afresh."""
    if machine_building():
        log.info("A build runs on this machine; leaving building records alone")
        return
    host = socket.gethostname()
    for build in all_builds(config, zk):
        if build.state == BuildState.BUILDING and build.builder == host:
            log.warning("Build %s was left building by a dead builder: failed", _build_key(build))
            if build.path:
                _end_run(Path(build.path))
                shutil.rmtree(Path(build.path) / "rootfs", ignore_errors=True)
                Path(build.path, f"{build.image}.tar").unlink(missing_ok=True)
                with suppress(OSError), open(Path(build.path) / "build.log", "a") as out:
                    out.write("zuul-lite builder: the builder died during this build\n")
            build.state = BuildState.FAILED
            zk.store_image_build(build.image, build)
            if config.diskimage(build.image) is not None:
                zk.request_image_build(build.image)


def cleanup(config: Config, zk: ZooKeeper) -> None:
    """Retention, as Nodepool's CleanupWorker: keep the newest KEEP_READY ready
    builds of each configured image (and any build a node still boots from),
    failed builds until a newer build is ready (their log explains the failure),
    and nothing of images no longer configured; then remove dirs with no record."""
    leftovers = sorted(images_dir(config).glob("*-*"))  # before the records: see below
    in_use = {n.image_build for n in zk.nodes() if n.image_build}
    builds = all_builds(config, zk)
    for build in builds:
        if _build_key(build) in in_use or build.state == BuildState.BUILDING:
            continue
        if build.state == BuildState.DELETING or _expired(config, build, builds):
            if zk.get_image_uploads(build.image, build.id or ""):
                # The upload worker deletes its uploads first (uploader.py).
                if build.state != BuildState.DELETING:
                    build.state = BuildState.DELETING
                    zk.store_image_build(build.image, build)
                continue
            remove_build(config, zk, build)
    # A dir listed before the records were read had its record stored already
    # (build_image stores it before mkdir), so "no record" means leaked.
    known = {_build_key(b) for b in builds}
    for path in leftovers:
        if path.is_dir() and path.name not in known:
            log.info("Removing leftover image dir %s", path)
            shutil.rmtree(path, ignore_errors=True)


def _expired(config: Config, build: ImageBuild, builds: list[ImageBuild]) -> bool:
    if config.diskimage(build.image) is None:
        return True
    ready = [b for b in builds if b.image == build.image and b.state == BuildState.READY]
    if build.state == BuildState.READY:
        return build not in ready[-KEEP_READY:]
    return bool(ready) and ready[-1].created_time > build.created_time


def build_due(config: Config, zk: ZooKeeper, image_name: str, now: float) -> bool:
    """An image needs a build when it has none, or when its newest ready build is
    older than `rebuild-age`. A failure is retried after `rebuild-age` too (at
    most an hour), so a broken mirror does not turn the builder into a busy loop."""
    diskimage = get_diskimage(config, image_name)
    builds = zk.get_image_builds(image_name)
    if any(b.state == BuildState.BUILDING for b in builds):
        return False
    ready = [b for b in builds if b.state == BuildState.READY]
    failed = [b for b in builds if b.state == BuildState.FAILED]
    if failed and (not ready or failed[-1].created_time > ready[-1].created_time):
        return now - failed[-1].created_time > min(diskimage.rebuild_age, 3600)
    return not ready or now - ready[-1].created_time > diskimage.rebuild_age


class BuildWorker(BaseWorker):
    """Builds requested images at once (ZK watch on the request path) and stale
    ones on a tick; one build at a time, like Nodepool's BuildWorker."""

    def __init__(self, config: Config, zk: ZooKeeper, interval: float = 60.0):
        super().__init__(
            "nodepool-builder-build", threading.Event(), log, interval, first_pass_at_once=True
        )
        self.config = config
        self.zk = zk
        self.current: BuildRun | None = None
        self.on_built: Callable[[], None] | None = None  # wakes the upload worker
        self.on_finished: Callable[[ImageBuild], None] | None = None  # counts it (metrics)

    def stop(self) -> None:
        super().stop()
        if self.current is not None:
            self.current.cancel()

    def run(self) -> None:
        self.zk.watch_children(IMAGE_BUILD_REQUEST_ROOT, self._on_requests)
        super().run()

    def _on_requests(self, children: list[str]) -> bool:
        if children:
            self.wake()
        return not self.stop_event.is_set()

    def run_once(self) -> None:
        requested = self.zk.get_image_build_requests()
        for name in requested:
            if self.config.diskimage(name) is None:
                log.warning("Ignoring build request for unknown image %s", name)
                self.zk.remove_image_build_request(name)
        for name in image_names(self.config):
            if self.stop_event.is_set():
                return
            if name in requested or build_due(self.config, self.zk, name, time.time()):
                try:
                    self._build(name, requested=name in requested)
                except exc.ConfigError as error:  # this image only: the others still build
                    log.error("Not building %s: %s", name, error)

    def _build(self, name: str, requested: bool) -> None:
        """Build under the image's ZK lock, so two builders never build one image."""
        try:
            lock = self.zk.lock_image(name, socket.gethostname(), blocking=False)
        except exc.LockError:
            # A build request stays until a builder holds the lock: one
            # killed with -9 holds it until its session expires, and the
            # build it left is to be made again.
            log.info("Another builder is building %s; waiting for its lock", name)
            self._wake_when_unlocked(name)
            return
        try:
            if requested:
                # Before the build: a request made while it runs asks for another.
                self.zk.remove_image_build_request(name)
            self.current = BuildRun()
            if not self.stop_event.is_set():
                build = build_image(self.config, self.zk, name, run=self.current)
                if self.on_finished is not None:
                    self.on_finished(build)
                if self.on_built is not None:
                    self.on_built()
        finally:
            self.current = None
            lock.release()

    def _wake_when_unlocked(self, name: str) -> None:
        def on_holders(holders: list[str]) -> bool | None:
            if not holders or self.stop_event.is_set():
                self.wake()
                return False
            return None

        self.zk.watch_children(f"{IMAGE_ROOT}/{name}/lock", on_holders)


class CleanupWorker(BaseWorker):
    """Runs `cleanup()` every `interval` seconds."""

    def __init__(self, config: Config, zk: ZooKeeper, interval: float = 60.0):
        super().__init__(
            "nodepool-builder-cleanup", threading.Event(), log, interval, first_pass_at_once=True
        )
        self.config = config
        self.zk = zk

    def run_once(self) -> None:
        cleanup(self.config, self.zk)


class NodePoolBuilder:
    """The `nodepool builder` daemon: reconcile, then the build and cleanup workers."""

    def __init__(self, config: Config, zk: ZooKeeper, interval: float = 60.0):
        self.config = config
        self.zk = zk
        self.build_worker = BuildWorker(config, zk, interval)
        self.cleanup_worker = CleanupWorker(config, zk, interval)
        self.upload_worker = UploadWorker(config, zk, interval)
        self.build_worker.on_built = self.upload_worker.wake
        self.metrics: MetricsServer | None = None
        if config.metrics_builder_port is not None:
            registry = CollectorRegistry()
            registry.register(StateCollector(zk))
            self.build_worker.on_finished = BuilderMetrics(registry).finished
            self.metrics = MetricsServer(
                registry, config.metrics_listen, config.metrics_builder_port
            )

    def start(self) -> None:
        images_dir(self.config).mkdir(parents=True, exist_ok=True)
        reconcile(self.config, self.zk)
        self.cleanup_worker.start()
        self.upload_worker.start()
        self.build_worker.start()
        if self.metrics is not None:
            self.metrics.start()
        log.info("Builder started for images %s", ", ".join(image_names(self.config)))

    def reconfigure(self, config: Config) -> None:
        """`config` for the next passes (SIGHUP); a running build goes on.
        ZooKeeper and metrics settings take a restart. A config naming an
        element that does not exist raises ConfigError (one sentence) and
        changes nothing: the daemon keeps building with the one it has."""
        for diskimage in config.diskimages:
            check_elements(config, diskimage)
        self.config = config
        self.build_worker.config = self.cleanup_worker.config = config
        self.upload_worker.targets = uploaders(config)
        self.build_worker.wake()
        self.upload_worker.wake()
        log.info("Builder reconfigured for images %s", ", ".join(image_names(config)))

    def stop(self) -> None:
        self.build_worker.stop()
        self.cleanup_worker.stop()
        self.upload_worker.stop()
        if self.metrics is not None:
            self.metrics.stop()

    def join(self, timeout: float | None = None) -> None:
        self.build_worker.join(timeout)
        self.cleanup_worker.join(timeout)
        self.upload_worker.join(timeout)
