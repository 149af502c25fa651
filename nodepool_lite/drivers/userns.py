"""Nodes run in a user namespace: root in a node is an unprivileged uid on the host.

Every container node maps its uids 0-65535 to NODE_UID_BASE.. on the host
(`systemd-nspawn --private-users=NODE_UID_BASE:65536`), so a patch that gets
root in its node holds no capability over the host's files, processes or
devices. The kernel here has no ID-mapped mounts, and letting nspawn chown a
node's overlay at boot copies the whole image up (21.9 s, 635 MB measured), so
an image's rootfs is shifted once instead (owners +NODE_UID_BASE, modes and
setuid bits kept), marked done, and every node's overlay shares it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
from pathlib import Path

log = logging.getLogger("nodepool_lite.drivers.userns")

NODE_UID_BASE = 0x70000000  # far above any uid or subuid range in use
NODE_UID_COUNT = 65536


def host_id(node_id: int) -> int:
    """The host's uid (or gid) for `node_id` inside a node."""
    if not 0 <= node_id < NODE_UID_COUNT:
        raise ValueError(f"id {node_id} is outside a node's range")
    return NODE_UID_BASE + node_id


def _shift(path: Path) -> None:
    st = os.lstat(path)
    uid, gid = st.st_uid, st.st_gid
    if uid >= NODE_UID_BASE and gid >= NODE_UID_BASE:
        return  # done by an earlier, interrupted run
    nobody = NODE_UID_COUNT - 2  # what an id outside the range becomes
    os.lchown(
        path,
        host_id(uid if uid < NODE_UID_COUNT else nobody),
        host_id(gid if gid < NODE_UID_COUNT else nobody),
    )
    if not stat.S_ISLNK(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
        os.chmod(path, stat.S_IMODE(st.st_mode))  # chown cleared them


def shift_rootfs(rootfs: Path) -> None:
    """Give an image's rootfs the owners its files have inside a node (once;
    concurrent callers wait for the one that does it)."""
    rootfs = rootfs.resolve()  # a symlink to the tree: shift the tree
    mark = rootfs.parent / f".{rootfs.name}.uids-shifted-{NODE_UID_BASE:x}"
    if mark.exists():
        return
    with open(f"{mark}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if mark.exists():
            return
        log.info("Shifting the owners of %s into the nodes' uid range", rootfs)
        count = 0
        for top, dirs, files in os.walk(rootfs):
            for name in dirs + files:
                _shift(Path(top, name))
                count += 1
        _shift(rootfs)
        mark.write_text(f"{count}\n")
        log.info("Shifted %d files of %s", count, rootfs)
