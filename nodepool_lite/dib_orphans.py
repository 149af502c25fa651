"""What a disk-image-create run leaves when its builder dies (kill -9, power
loss): the dib processes themselves (they run in their own session, so they
outlive the builder), mounts (tmpfs build dirs, the chroot's /proc, /dev,
/sys, bind-mounted caches) and loop devices.

The builder points dib's TMP_DIR at `<build dir>/tmp`, so everything of one
build is found from its build dir alone, with no pid file to get out of
step: processes whose command line names the build dir, whose environment
holds its TMP_DIR (inherited across fork and exec, so a child forked just as
its parent was killed, now an orphan of init, is still found) or whose root
or working directory lies under it (the chroot's), with all their
descendants; mounts below it; loop devices backed by a file below it.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import time
from pathlib import Path

from nodepool_lite.drivers import process_argvs

log = logging.getLogger("nodepool_lite.builder.orphans")


def tmp_dir(build_dir: Path) -> Path:
    """dib's TMP_DIR for one build."""
    return build_dir / "tmp"


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top + "/")


def _link(pid: int, name: str) -> str:
    try:
        return os.readlink(f"/proc/{pid}/{name}")
    except OSError:
        return ""


def _parents() -> dict[int, int]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            out[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def _has_env(pid: int, entry: bytes) -> bool:
    try:
        return entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def build_processes(build_dir: Path) -> set[int]:
    """Every process of the build in `build_dir`, and their descendants."""
    top = str(build_dir)
    mark = os.fsencode(top)
    env = b"TMP_DIR=" + os.fsencode(tmp_dir(build_dir))
    found = {
        pid
        for pid, argv in process_argvs()
        if pid != os.getpid()
        and (
            any(arg == mark or arg.startswith(mark + b"/") for arg in argv)
            or _under(_link(pid, "root"), top)
            or _under(_link(pid, "cwd"), top)
            or _has_env(pid, env)
        )
    }
    parents = _parents()
    grew = True
    while grew:
        children = {pid for pid, ppid in parents.items() if ppid in found} - found
        found |= children
        grew = bool(children)
    return found


def kill_build(build_dir: Path, timeout: float = 30.0) -> set[int]:
    """SIGKILL every process of the build until none is left (a dying shell
    may still fork); returns the pids killed. Raises TimeoutError if some
    outlive `timeout` (stuck in the kernel)."""
    killed: set[int] = set()
    deadline = time.monotonic() + timeout
    while pids := build_processes(build_dir):
        if time.monotonic() > deadline:
            raise TimeoutError(f"processes {sorted(pids)} of {build_dir} do not die")
        for pid in pids - killed:
            log.warning("Killing process %d left by the build in %s", pid, build_dir)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        killed |= pids
        wait_exited(pids, deadline)
    return killed


def wait_exited(pids: set[int], deadline: float) -> None:
    """Until each of `pids` has exited (its pidfd turns readable) or `deadline`."""
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        finally:
            os.close(fd)


def release_mounts(top: Path) -> list[str]:
    """Detach loop devices backed by files below `top`, then unmount
    everything below it, deepest first (lazily if busy); returns what was
    released. Loops first: once the mount holding its file is gone, a loop
    device names its file relative to nothing and cannot be told apart."""
    prefix = str(top)
    released = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            target = backing.read_text().strip()
        except OSError:
            continue
        if _under(target.removesuffix(" (deleted)"), prefix):
            device = f"/dev/{backing.parent.parent.name}"
            subprocess.run(["losetup", "-d", device], capture_output=True)
            log.warning("Detached %s (%s) left by a build", device, target)
            released.append(device)
    with open("/proc/self/mountinfo") as mounts:
        points = [line.split()[4] for line in mounts]
    for point in sorted({p for p in points if _under(p, prefix)}, key=len, reverse=True):
        result = subprocess.run(["umount", point], capture_output=True, text=True)
        if result.returncode != 0:
            subprocess.run(["umount", "-l", point], capture_output=True)
        log.warning("Unmounted %s left by a build", point)
        released.append(point)
    return released
