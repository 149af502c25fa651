"""What a node may take of its host: memory, tasks and CPU (cgroups), and disk.

A build that runs away (a fork bomb in a Makefile, a test that eats memory,
a loop filling the disk) fails that build, never the host or the other nodes.

There is no systemd as PID 1 here, so nobody else manages cgroups: a node gets
a cgroup of its own per controller, named after it, which the container's
first process enters before it execs (so everything it starts is inside).
cgroup v1 (what this machine has: memory, pids, cpu) and the unified v2
hierarchy are both handled.

The disk cap is a sparse ext4 image of the label's size, loop-mounted as the
filesystem that holds the node's overlay upper and work dirs: everything the
node writes lands there, and a full disk is the node's ENOSPC alone.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import time
from pathlib import Path

from nodepool_lite.drivers.nspawn.config import Limits
from nodepool_lite.exceptions import LaunchError

log = logging.getLogger("nodepool_lite.drivers.nspawn.limits")

CGROUP_ROOT = Path("/sys/fs/cgroup")
GROUP = "zuul-lite-nodes"  # parent of every node's cgroup
CPU_PERIOD_US = 100_000


def _unified() -> bool:
    return (CGROUP_ROOT / "cgroup.controllers").exists()


class NodeCgroup:
    """The cgroups of one node; `enter()` runs in the child before exec."""

    def __init__(self, node_dir: Path) -> None:
        # Node ids are unique per ZooKeeper, not per host: the node's directory is.
        digest = hashlib.sha1(str(node_dir).encode()).hexdigest()[:12]
        self.name = f"node-{node_dir.name}-{digest}"
        if _unified():
            self.dirs = {"unified": CGROUP_ROOT / GROUP / self.name}
        else:
            self.dirs = {c: CGROUP_ROOT / c / GROUP / self.name for c in ("memory", "pids", "cpu")}

    def create(self, limits: Limits) -> None:
        memory = str(limits.memory_mb * 1024 * 1024)
        quota = int(limits.cpus * CPU_PERIOD_US) if limits.cpus else None
        try:
            if "unified" in self.dirs:
                parent = self.dirs["unified"].parent
                parent.mkdir(exist_ok=True)
                (parent / "cgroup.subtree_control").write_text("+memory +pids +cpu")
                self._write("unified", "memory.max", memory)
                self._write("unified", "memory.swap.max", "0")
                self._write("unified", "pids.max", str(limits.tasks))
                self._write("unified", "cpu.max", f"{quota or 'max'} {CPU_PERIOD_US}")
            else:
                self._write("memory", "memory.limit_in_bytes", memory)
                self._write("pids", "pids.max", str(limits.tasks))
                self._write("cpu", "cpu.cfs_period_us", str(CPU_PERIOD_US))
                self._write("cpu", "cpu.cfs_quota_us", str(quota or -1))
        except OSError as error:
            raise LaunchError(f"Cannot set the node's resource limits: {error}.") from error

    def _write(self, controller: str, name: str, value: str) -> None:
        path = self.dirs[controller]
        path.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(value)

    def wrap(self, cmd: list[str]) -> list[str]:
        """`cmd` run by a shell that first moves itself into the node's cgroups:
        the container and all it starts are inside from their first instruction
        (a preexec_fn would do the same, but is not safe in a threaded daemon)."""
        enter = " && ".join(f'echo $$ > "{path}/cgroup.procs"' for path in self.dirs.values())
        return ["/bin/sh", "-c", f'{enter} && exec "$@"', "node-cgroup", *cmd]

    def read(self, controller: str, name: str) -> str:
        return (self.dirs[controller] / name).read_text().strip()

    def remove(self, timeout: float = 10.0) -> None:
        """Once the node's processes are gone: killed ones take a moment to
        leave, and rmdir refuses a cgroup that still has any."""
        deadline = time.monotonic() + timeout
        for path in self.dirs.values():
            while True:
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as error:
                    if time.monotonic() > deadline:
                        log.warning("cgroup %s not removed: %s", path, error)
                        break
                    time.sleep(0.05)


class NodeDisk:
    """`<node>/disk.img` mounted at `<node>/disk`: where the overlay's upper and work live."""

    def __init__(self, node_dir: Path) -> None:
        self.image = node_dir / "disk.img"
        self.mount = node_dir / "disk"

    def create(self, size_mb: int) -> None:
        self.mount.mkdir(parents=True, exist_ok=True)
        with open(self.image, "wb") as image:
            image.truncate(size_mb * 1024 * 1024)  # sparse: takes what is written
        for cmd in (
            ["mkfs.ext4", "-q", "-F", "-m", "0",
             "-E", "lazy_itable_init=1,lazy_journal_init=1", str(self.image)],
            ["mount", "-o", "loop,nodev,nosuid", str(self.image), str(self.mount)],
        ):  # fmt: skip
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                raise LaunchError(f"Cannot make the node's disk: {result.stderr.strip()}.")

    def remove(self) -> None:
        """Unmount (the loop device goes with it) and delete; safe when half made."""
        if is_mounted(self.mount):
            result = subprocess.run(["umount", str(self.mount)], capture_output=True, text=True)
            if result.returncode != 0:
                log.warning("umount %s failed (%s); detaching", self.mount, result.stderr.strip())
                subprocess.run(["umount", "-l", str(self.mount)], check=False)
        # A loop device left by a launcher killed between mount and bookkeeping.
        found = subprocess.run(
            ["losetup", "-n", "-O", "NAME", "-j", str(self.image)], capture_output=True, text=True
        )
        for device in found.stdout.split():
            subprocess.run(["losetup", "-d", device], check=False)
        self.image.unlink(missing_ok=True)


def is_mounted(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mountinfo") as mounts:
        return any(line.split()[4] == target for line in mounts)
