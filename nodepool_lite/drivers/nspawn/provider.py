"""Throwaway nodes as systemd-nspawn containers over an overlay of an image.

A node is cheap to make and to forget: an overlayfs (`upper/ work/ root/`
under `<state>/nodes/<id>/`) over the `rootfs/` of the newest ready image
build, and `systemd-nspawn --as-pid2` running only sshd. The node has a
network namespace of its own with nothing but its loopback
(`--private-network`): code run by a job reaches no address of the host, no
service on the host's loopback and no other node. sshd listens on the node's
127.0.0.1:22, which a port of the host forwards to (nodepool_lite/drivers/
netns.py). Destroying a node kills the container, closes its port, unmounts
and removes the directory, so nothing a job did survives it.

Container processes are found by their root directory (`/proc/<pid>/root`
has the same inode as the node's `root/`), not by pids we remembered, so a
restarted launcher can adopt or destroy containers started by its
predecessor.
"""

from __future__ import annotations

import base64
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from nodepool_lite.drivers import ensure_keypair, process_argvs
from nodepool_lite.drivers.base import Provider, ProviderConfig, RequestHandler, node_dirs
from nodepool_lite.drivers.netns import forward_pids, start_forward
from nodepool_lite.drivers.nspawn.config import NspawnPool
from nodepool_lite.drivers.nspawn.limits import NodeCgroup, NodeDisk, is_mounted
from nodepool_lite.drivers.userns import NODE_UID_BASE, NODE_UID_COUNT, host_id, shift_rootfs
from nodepool_lite.exceptions import LaunchError
from nodepool_lite.model import BuildState, ImageBuild, Node
from nodepool_lite.zk import ZooKeeper

log = logging.getLogger("nodepool_lite.drivers.nspawn")

USERNAME = "zuul"
HOST_KEY = "etc/ssh/ssh_host_ed25519_key"
SSH_PORT = 22  # on the node's own loopback
FORWARD_HOST = "127.0.0.1"  # where the host's end of a node's ssh port listens


def _same_inode(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _netns(pid: int | str = "self") -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def container_pids(root: Path) -> list[int]:
    """Pids whose root directory is `root` (the container's init and below)."""
    want = _same_inode(root)
    if want is None:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _same_inode(Path(f"/proc/{entry}/root")) == want:
            pids.append(int(entry))
    return pids


def _namespaced_pids(root: Path) -> list[int]:
    """Container processes already in the node's own network namespace (not
    nspawn's short-lived outer child, which has the root but not the namespaces)."""
    own = _netns()
    return [pid for pid in container_pids(root) if _netns(pid) not in (None, own)]


def nspawn_roots() -> dict[int, Path]:
    """Every running systemd-nspawn: pid -> its `-D` directory."""
    return {
        pid: Path(os.fsdecode(argv[argv.index(b"-D") + 1]))
        for pid, argv in process_argvs()
        if argv[0].endswith(b"systemd-nspawn") and b"-D" in argv[:-1]
    }


def node_containers(nodes_dir: Path) -> dict[str, list[int]]:
    """Node id -> pids of the systemd-nspawn running it, for every node with
    a directory under `nodes_dir` ([] if only that is left) or a container
    rooted there: what a restarted launcher adopts or destroys as leaked, and
    what `nodepool alien-list` lists when ZooKeeper knows no such node."""
    found = node_dirs(nodes_dir)
    for pid, root in nspawn_roots().items():
        if root.parent.parent == nodes_dir:
            found.setdefault(root.parent.name, []).append(pid)
    return found


def _node_user(root: Path) -> tuple[int, int, str]:
    """uid, gid and home of `zuul` in the image."""
    for line in (root / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == USERNAME:
            return int(fields[2]), int(fields[3]), fields[5]
    raise LaunchError(f"The image has no user {USERNAME!r}.")


def _give(path: Path, uid: int = 0, gid: int = 0) -> None:
    """Owned by `uid`:`gid` as the node sees it (files we write into its root)."""
    os.lchown(path, host_id(uid), host_id(gid))


def _write_authorized_key(root: Path, public_key: str) -> None:
    """Authorise the launcher's key for `zuul`, owned by the image's uid/gid."""
    uid, gid, home = _node_user(root)
    ssh_dir = root / home.lstrip("/") / ".ssh"
    ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    keys = ssh_dir / "authorized_keys"
    keys.write_text(public_key)
    keys.chmod(0o600)
    for path in (ssh_dir.parent, ssh_dir, keys):
        _give(path, uid, gid)


def _add_hosts_entry(root: Path, hostname: str) -> None:
    """nspawn sets the hostname to the machine name; without this line sudo
    warns "unable to resolve host" on every call, polluting job output."""
    hosts = root / "etc/hosts"
    text = "127.0.0.1\tlocalhost\n"
    if hosts.is_symlink():  # would resolve on the host: replace, never follow
        hosts.unlink()
    elif hosts.exists():
        text = hosts.read_text()
    hosts.write_text(f"{text.rstrip()}\n127.0.1.1\t{hostname}\n")
    _give(hosts)


def _write_host_key(root: Path, comment: str) -> str:
    """A fresh ed25519 host key per node; returns its public line for known_hosts."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    path = root / HOST_KEY
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(private)
    Path(f"{path}.pub").write_text(f"{public} {comment}\n")
    for written in (path, Path(f"{path}.pub")):
        _give(written)
    return public


class NspawnProvider(Provider):
    """Boots and destroys nspawn nodes under `<state>/nodes/`."""

    def __init__(self, provider: ProviderConfig, state_dir: Path, zk: ZooKeeper):
        super().__init__(provider, state_dir, zk)
        self.nodes_dir = self.state_dir / "nodes"
        self.nodes_dir.mkdir(parents=True, exist_ok=True)
        self.private_key = ensure_keypair(self.state_dir)
        self.public_key = Path(f"{self.private_key}.pub").read_text()
        self._procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()
        self.trash_dir = self.nodes_dir / ".trash"
        self._trash_remover: threading.Thread | None = None
        self._trash_pending = False
        if self.trash_dir.exists():
            self._empty_trash()

    def request_handler(self, pool: NspawnPool) -> RequestHandler:  # type: ignore[override]
        return NspawnRequestHandler(self, pool)

    def image(self, pool: NspawnPool, label: str) -> ImageBuild | None:
        """The newest ready build of `label`'s diskimage, if its rootfs is there."""
        diskimage = pool.labels[label].diskimage
        build = self.zk.get_most_recent_image_build(diskimage or "", BuildState.READY)
        if build is None or not build.path or not (Path(build.path) / "rootfs").is_dir():
            return None
        return build

    def node_dir(self, node_id: str) -> Path:
        return self.nodes_dir / node_id

    def launch(self, node: Node, pool: NspawnPool) -> None:
        assert node.id is not None
        build = self.image(pool, node.type)
        if build is None:
            raise LaunchError(f"No ready image build for label {node.type}.")
        start = time.monotonic()
        try:
            self._boot(node, pool, build)
        except Exception:
            self.cleanup_node(node.id)
            raise
        log.info(
            "Node %s (%s) ready on 127.0.0.1:%s in %.2fs",
            node.id,
            node.type,
            node.connection_port,
            time.monotonic() - start,
        )

    def _boot(self, node: Node, pool: NspawnPool, build: ImageBuild) -> None:
        assert node.id is not None and build.path is not None
        node_dir = self.node_dir(node.id)
        limits = pool.labels[node.type].limits
        disk = NodeDisk(node_dir)
        disk.create(limits.disk_mb)
        cgroup = NodeCgroup(node_dir)
        cgroup.create(limits)
        upper, work, root = disk.mount / "upper", disk.mount / "work", node_dir / "root"
        for path in (upper, work, root):
            path.mkdir(parents=True, exist_ok=True)
        lower = Path(build.path) / "rootfs"
        shift_rootfs(lower)
        # The overlay's own root is the upper dir's: the node's root owns "/".
        _give(upper)
        options = f"lowerdir={lower},upperdir={upper},workdir={work}"
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", options, str(root)],
            check=True,
            capture_output=True,
        )
        machine = f"np-{node.id}"
        _write_authorized_key(root, self.public_key)
        _add_hosts_entry(root, machine)
        host_key = _write_host_key(root, machine)
        binds = []
        for bind, writable in pool.mounts(node.type):
            Path(bind.host).mkdir(parents=True, exist_ok=True)
            if writable:
                # A writable mount (the trusted label's compiler cache) must be
                # writable by the node's user, whatever created it on the host.
                uid, gid, _ = _node_user(root)
                _give(Path(bind.host), uid, gid)
            binds.append(f"{'--bind' if writable else '--bind-ro'}={bind.host}:{bind.node}")
        sshd = (
            "mkdir -p /run/sshd && exec /usr/sbin/sshd -D -e"
            f" -p {SSH_PORT} -o ListenAddress=127.0.0.1 -o HostKey=/{HOST_KEY}"
        )
        cmd = [
            "systemd-nspawn", "--quiet", "-D", str(root), "--register=no", "--keep-unit",
            "--as-pid2", f"--machine={machine}", "--console=pipe", "--private-network",
            f"--private-users={NODE_UID_BASE}:{NODE_UID_COUNT}", "--private-users-ownership=off",
            *binds, "--", "/bin/sh", "-c", sshd,
        ]  # fmt: skip
        log.debug("Starting node %s: %s", node.id, cmd)
        with open(node_dir / "console.log", "wb") as console:
            proc = subprocess.Popen(
                cgroup.wrap(cmd), stdin=subprocess.DEVNULL, stdout=console,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        with self._lock:
            self._procs[node.id] = proc
        pid = self._container_pid(node, proc, pool.boot_timeout)
        try:
            port = start_forward(node_dir, pid, SSH_PORT, FORWARD_HOST)
        except OSError as error:
            raise LaunchError(f"Node {node.id}: {error}.") from error
        node.external_id = machine
        node.interface_ip = FORWARD_HOST
        node.connection_port = port
        node.username = USERNAME
        node.host_keys = [host_key]
        node.image_build = f"{build.image}-{build.id}"
        self._wait_for_ssh(node, proc, host_key, pool.boot_timeout)

    def _container_pid(self, node: Node, proc: subprocess.Popen, timeout: float) -> int:
        """A process of the container (in its network namespace), once nspawn made it."""
        root = self.node_dir(node.id or "") / "root"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LaunchError(
                    f"Node {node.id}: container exited ({proc.returncode}): {self._tail(node)}"
                )
            pids = _namespaced_pids(root)
            if pids:
                return min(pids)
            time.sleep(0.02)  # nspawn tells nothing when the container is up
        raise LaunchError(f"Node {node.id}: no container within {timeout:.0f}s.")

    def adopt(self, node: Node) -> bool:
        """A node a previous nodepool launcher started: its forward runs on,
        or is started again on the same port."""
        node_dir = self.node_dir(node.id or "")
        pids = _namespaced_pids(node_dir / "root")
        if not pids or not node.connection_port:
            return False
        if forward_pids(node_dir):
            return True
        try:
            start_forward(node_dir, min(pids), SSH_PORT, FORWARD_HOST, node.connection_port)
        except OSError as error:
            log.warning("Node %s: %s", node.id, error)
            return False
        return True

    def _wait_for_ssh(
        self, node: Node, proc: subprocess.Popen, host_key: str, timeout: float
    ) -> None:
        """Ready means the launcher's key logs in and the host key matches."""
        key = paramiko.Ed25519Key.from_private_key_file(str(self.private_key))
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LaunchError(
                    f"Node {node.id}: container exited ({proc.returncode}): {self._tail(node)}"
                )
            try:
                client = paramiko.SSHClient()
                kind, blob = host_key.split()[:2]
                client.get_host_keys().add(
                    f"[{node.interface_ip}]:{node.connection_port}",
                    kind,
                    paramiko.Ed25519Key(data=base64.b64decode(blob)),
                )
                client.set_missing_host_key_policy(paramiko.RejectPolicy())
                try:
                    client.connect(
                        node.interface_ip, port=node.connection_port, username=USERNAME, pkey=key,
                        timeout=5, allow_agent=False, look_for_keys=False,
                    )  # fmt: skip
                finally:
                    client.close()
                return
            except (OSError, paramiko.SSHException) as error:
                last_error = error
            time.sleep(0.05)  # sshd gives no readiness signal; poll its port
        raise LaunchError(
            f"Node {node.id}: no ssh login within {timeout:.0f}s ({last_error}): "
            f"{self._tail(node)}"
        )

    def _tail(self, node: Node) -> str:
        try:
            text = (self.node_dir(node.id or "") / "console.log").read_text(errors="replace")
        except OSError:
            return "(no console log)"
        return " | ".join(text.strip().splitlines()[-5:])

    def node_alive(self, node: Node) -> bool:
        return bool(node.id and container_pids(self.node_dir(node.id) / "root"))

    def leaked_node_ids(self) -> list[str]:
        return sorted(node_containers(self.nodes_dir))

    def cleanup_node(self, node_id: str) -> None:
        node_dir = self.node_dir(node_id)
        root = node_dir / "root"
        # Killing the container's init tears down its pid namespace at once;
        # nspawn then exits by itself.
        for pid in container_pids(root):
            _kill(pid, signal.SIGKILL)
        for pid in forward_pids(node_dir):  # it would end with the container anyway
            _kill(pid, signal.SIGKILL)
        with self._lock:
            proc = self._procs.pop(node_id, None)
        if proc is not None:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid, nspawn_root in nspawn_roots().items():
            if nspawn_root == root:  # a predecessor's: ask it to stop its container
                _kill(pid, signal.SIGTERM)
                if not _wait_gone(pid):
                    _kill(pid, signal.SIGKILL)
        if is_mounted(root):
            result = subprocess.run(["umount", str(root)], capture_output=True)
            if result.returncode != 0:
                log.warning("umount %s failed (%s); detaching", root, result.stderr.strip())
                subprocess.run(["umount", "-l", str(root)], check=True)
        NodeDisk(node_dir).remove()
        NodeCgroup(node_dir).remove()
        if node_dir.exists():
            # The upper dir holds a whole kernel tree and its build: removing
            # 80k files takes minutes under load, so move it aside (instant, same
            # filesystem) and free the node's slot now.
            trash = self.trash_dir / f"{node_id}-{time.time_ns()}"
            self.trash_dir.mkdir(exist_ok=True)
            try:
                node_dir.rename(trash)
            except OSError as e:
                raise LaunchError(f"Node {node_id}: could not remove {node_dir} ({e}).") from e
            self._empty_trash()
        log.info("Node %s destroyed", node_id)

    def _empty_trash(self) -> None:
        """Remove what destroyed nodes left, in the background, one remover at a time."""
        with self._lock:
            if self._trash_remover is not None and self._trash_remover.is_alive():
                self._trash_pending = True
                return
            self._trash_pending = False
            self._trash_remover = threading.Thread(
                target=self._remove_trash, name="nspawn-trash", daemon=True
            )
            self._trash_remover.start()

    def _remove_trash(self) -> None:
        while True:
            for entry in sorted(self.trash_dir.glob("*")):
                shutil.rmtree(entry, ignore_errors=True)
            with self._lock:
                if not self._trash_pending:
                    self._trash_remover = None
                    return
                self._trash_pending = False


class NspawnRequestHandler(RequestHandler):
    provider: NspawnProvider
    pool: NspawnPool

    def ready(self, labels: list[str]) -> bool:
        return all(self.provider.image(self.pool, label) is not None for label in labels)

    def launch(self, node: Node) -> None:
        self.provider.launch(node, self.pool)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _wait_gone(pid: int, timeout: float = 10.0) -> bool:
    """Wait for a process we are not the parent of (a predecessor's nspawn)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return True
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return True
        time.sleep(0.02)
    return False
