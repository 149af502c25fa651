"""Throwaway nodes as QEMU VMs on this host.

A node is `<base>/nodes/<id>/` (`<base>` = `<state-dir>/qemu/<provider>`):
a qcow2 overlay of the provider's copy of the image (images.py), so nothing
a job writes reaches the image or another node, and the node's ssh host key.
QEMU boots the image's kernel and initrd with `root=/dev/vda` and user-mode
networking with `restrict=on`: the guest reaches no address of the host or
beyond; its one way in is sshd's port, forwarded from a port on the host's
127.0.0.1. The launcher's public key, the host key and the hostname reach
the guest over fw_cfg (the vm-node element's zuul-lite-vm-setup reads them),
so one image serves every node and no file is written into it per node.

The serial console goes to `<base>/consoles/<id>.log`, named in the node
record (`console_log`) and kept after the node is gone (the newest
KEEP_CONSOLES), because it is what explains a boot that failed.

QEMU runs in a session of its own: a launcher that dies leaves its VMs
running, and the next one finds them by their command line (the overlay's
path names the node), adopts those whose node is in ZooKeeper and kills
the rest (cleanup_node), deleting their directories.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from nodepool_lite.dib_orphans import wait_exited
from nodepool_lite.drivers import ensure_keypair, process_argvs
from nodepool_lite.drivers.base import Provider, RequestHandler, node_dirs
from nodepool_lite.drivers.qemu.config import QemuLabel, QemuPool, QemuProviderConfig
from nodepool_lite.drivers.qemu.images import ImageStore, StoredImage
from nodepool_lite.exceptions import LaunchError
from nodepool_lite.model import Node
from nodepool_lite.zk import ZooKeeper

log = logging.getLogger("nodepool_lite.drivers.qemu")

QEMU = "qemu-system-x86_64"
OVERLAY = "overlay.qcow2"
HOST = "127.0.0.1"  # where the host's end of a node's ssh port listens
GUEST_SSH_PORT = 22
FW_CFG = "opt/zuul-lite"  # where the vm-node element's zuul-lite-vm-setup reads
KEEP_CONSOLES = 200
# paramiko logs every failed ssh handshake with a traceback; while a guest
# boots they are expected, and the last one is in the LaunchError if it never
# answers.
POLL_LOG = "nodepool_lite.drivers.qemu.sshpoll"
logging.getLogger(POLL_LOG).setLevel(logging.CRITICAL)
# The kernel command line: the root disk, the serial console, the interface
# name the vm-node element configures, and none of the work a throwaway TCG
# guest does not need at boot (fsck, crypto self-tests, the PS/2 controller
# probe, TSC checks, audit, AppArmor, Spectre mitigations).
KERNEL_ARGS = (
    "root=/dev/vda rootfstype=ext4 rw console=ttyS0 net.ifnames=0 fsck.mode=skip "
    "cryptomgr.notests i8042.noaux i8042.nokbd i8042.nopnp tsc=reliable no_timer_check "
    "audit=0 apparmor=0 mitigations=off nowatchdog systemd.show_status=0"
)
# What QEMU prints when KVM opens but cannot run the guest ("KVM internal
# error. Suberror: 1 / emulation failure"; QEMU then pauses the VM) ...
KVM_FAILURES = ("KVM internal error", "emulation failure", "failed to initialize kvm")
# ... or, as on this host, nothing at all while the guest never runs: a
# kernel under KVM prints its first console line within a second or two.
KVM_SILENCE = 20.0


class KvmFailed(Exception):
    """KVM does not run guests here: boot again with TCG."""


# Where a provider keeps "KVM failed at run time on this host", for this
# boot of the host only: a restarted or reloaded launcher does not pay the
# KVM_SILENCE probe again, and a host rebooted (a kvm module loaded, a
# hypervisor changed) is tried afresh.
KVM_VERDICT = "kvm-failed"
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def _boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""


def kvm_failed_here(base: Path) -> bool:
    """Whether KVM was found not to run guests since this host booted."""
    try:
        return (base / KVM_VERDICT).read_text().split("\n", 1)[0] == _boot_id()
    except OSError:
        return False


def record_kvm_failure(base: Path, reason: str) -> None:
    (base / KVM_VERDICT).write_text(f"{_boot_id()}\n{reason}\n")


def kvm_usable() -> bool:
    """/dev/kvm opens for read and write (it may still fail at run time)."""
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
    except OSError:
        return False
    return True


def host_key_pair() -> tuple[bytes, str]:
    """A fresh ed25519 host key: (OpenSSH private key, "ssh-ed25519 <base64>")."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public.decode()


def free_port(host: str = HOST) -> int:
    """A port free now; QEMU binds it (a lost race fails that boot, which is retried)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def process_gone(pid: int) -> bool:
    """Gone or a zombie (a predecessor's QEMU is not our child to reap)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def qemu_pids(nodes_dir: Path) -> dict[str, list[int]]:
    """Node id -> pids of the QEMU processes booting an overlay under `nodes_dir`."""
    prefix = os.fsencode(f"file={nodes_dir}/")
    found: dict[str, list[int]] = {}
    for pid, argv in process_argvs():
        if not argv[0].endswith(QEMU.encode()):
            continue
        for arg in argv:
            if arg.startswith(prefix):
                node_id = os.fsdecode(arg[len(prefix) :]).split("/", 1)[0]
                found.setdefault(node_id, []).append(pid)
    return found


def qemu_nodes(nodes_dir: Path) -> dict[str, list[int]]:
    """Node id -> pids of its QEMU, for every node with a directory (overlay,
    keys) under `nodes_dir` ([] if only that is left) or a QEMU booting an
    overlay there: what a restarted launcher adopts or destroys as leaked,
    and what `nodepool alien-list` lists when ZooKeeper knows no such node."""
    found = node_dirs(nodes_dir)
    for node_id, pids in qemu_pids(nodes_dir).items():
        found[node_id] = pids
    return found


class QemuProvider(Provider):
    provider: QemuProviderConfig

    def __init__(self, provider: QemuProviderConfig, state_dir: Path, zk: ZooKeeper):
        super().__init__(provider, state_dir, zk)
        self.base = provider.base_dir
        self.nodes_dir = self.base / "nodes"
        self.consoles_dir = self.base / "consoles"
        for path in (self.nodes_dir, self.consoles_dir):
            path.mkdir(parents=True, exist_ok=True)
        self.images = ImageStore(self.base / "images")
        self.private_key = ensure_keypair(self.state_dir)
        self.public_key = Path(f"{self.private_key}.pub").read_text()
        self._procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()
        self._kvm_failed = kvm_failed_here(self.base)

    def request_handler(self, pool: QemuPool) -> RequestHandler:  # type: ignore[override]
        return QemuRequestHandler(self, pool)

    def node_dir(self, node_id: str) -> Path:
        return self.nodes_dir / node_id

    def image(self, label: QemuLabel) -> tuple[str, StoredImage] | None:
        """("<image>-<build id>", its files) of the newest ready upload of `label`'s image."""
        upload = self.zk.get_most_recent_upload(label.diskimage or "", self.provider.name)
        if upload is None or not upload.external_id:
            return None
        stored = self.images.image(upload.external_id)
        return (f"{upload.image}-{upload.build_id}", stored) if stored else None

    def accel(self) -> str:
        if self.provider.accel != "auto":
            return self.provider.accel
        return "kvm" if kvm_usable() and not self._kvm_failed else "tcg"

    # Launch --------------------------------------------------------------

    def launch(self, node: Node, pool: QemuPool) -> None:
        assert node.id is not None
        label = pool.labels[node.type]
        found = self.image(label)
        if found is None:
            raise LaunchError(
                f"No ready upload of image {label.diskimage} in {self.provider.name}."
            )
        start = time.monotonic()
        while True:
            accel = self.accel()
            try:
                self._boot(node, label, found, accel, start)
                break
            except KvmFailed as error:
                self.cleanup_node(node.id)
                if self.provider.accel == "kvm":
                    raise LaunchError(
                        f"Node {node.id}: KVM cannot run the guest ({error})."
                    ) from None
                log.warning("KVM cannot run guests here (%s); using TCG from now on", error)
                self._kvm_failed = True
                record_kvm_failure(self.base, str(error))
                start = time.monotonic()  # the TCG boot gets the whole boot-timeout
            except Exception:
                self.cleanup_node(node.id)
                raise
        log.info(
            "Node %s (%s) ready on %s:%s in %.1fs (%s)",
            node.id, node.type, HOST, node.connection_port, time.monotonic() - start, accel,
        )  # fmt: skip

    def _boot(
        self,
        node: Node,
        label: QemuLabel,
        found: tuple[str, StoredImage],
        accel: str,
        start: float,
    ) -> None:
        assert node.id is not None
        image_build, image = found
        node_dir = self.node_dir(node.id)
        node_dir.mkdir(parents=True, exist_ok=True)
        overlay = node_dir / OVERLAY
        result = subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(image.disk),
             str(overlay), f"{label.disk}M"],
            capture_output=True, text=True,
        )  # fmt: skip
        if result.returncode != 0:
            raise LaunchError(f"Node {node.id}: qemu-img create failed: {result.stderr.strip()}")
        private, public = host_key_pair()
        fw_cfg = {
            "authorized_keys": self.public_key.encode(),
            "host_key": private,
            "host_key.pub": f"{public} np-{node.id}\n".encode(),
            "hostname": f"np-{node.id}".encode(),
        }
        for name, data in fw_cfg.items():
            fd = os.open(node_dir / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
        port = free_port()
        console = self.consoles_dir / f"{node.id}.log"
        console.unlink(missing_ok=True)  # an earlier attempt's
        node.external_id = f"np-{node.id}"
        node.interface_ip = HOST
        node.connection_port = port
        node.username = label.username
        node.host_keys = [public]
        node.image_build = image_build
        node.console_log = str(console)
        self.zk.store_node(node)  # before QEMU: a crash from here leaves a findable VM
        cmd = [
            QEMU, "-name", node.external_id, "-nodefaults", "-no-user-config",
            "-display", "none", "-machine", "pc", "-accel", accel,
            "-m", str(label.memory), "-smp", str(label.cpus),
            "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", KERNEL_ARGS,
            "-drive", f"file={overlay},if=virtio,format=qcow2,cache=unsafe,discard=unmap",
            "-netdev", f"user,id=net0,restrict=on,hostfwd=tcp:{HOST}:{port}-:{GUEST_SSH_PORT}",
            "-device", "virtio-net-pci,netdev=net0",
            "-device", "virtio-rng-pci",
            "-serial", f"file:{console}",
            *[a for n in fw_cfg for a in ("-fw_cfg", f"name={FW_CFG}/{n},file={node_dir / n}")],
        ]  # fmt: skip
        log.debug("Starting node %s: %s", node.id, cmd)
        with open(node_dir / "qemu.log", "wb") as errors:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=errors, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        with self._lock:
            self._procs[node.id] = proc
        self._wait_for_ssh(node, proc, accel, start + self.provider.boot_timeout)

    def _wait_for_ssh(
        self, node: Node, proc: subprocess.Popen, accel: str, deadline: float
    ) -> None:
        """Ready means the launcher's key logs in and the host key is the node's."""
        key = paramiko.Ed25519Key.from_private_key_file(str(self.private_key))
        booted = time.monotonic()
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if accel == "kvm":
                self._check_kvm(node, booted)
            if proc.poll() is not None:
                raise LaunchError(
                    f"Node {node.id}: QEMU exited ({proc.returncode}): "
                    f"{self._qemu_log(node).strip() or self._console_tail(node)}"
                )
            try:
                self._login(node, key)
                return
            except (OSError, paramiko.SSHException, EOFError) as error:
                last_error = error
            time.sleep(0.5)  # sshd gives no readiness signal; poll its forwarded port
        raise LaunchError(
            f"Node {node.id}: no ssh login within {self.provider.boot_timeout:.0f}s "
            f"({last_error}); console: {self._console_tail(node)}"
        )

    def _login(self, node: Node, key: paramiko.PKey) -> None:
        """One ssh login as the node's user; raises while sshd is not up yet,
        LaunchError when something else answers with another host key. Long
        waits: sshd of a TCG guest on a busy host can take 10-20 s to send its
        banner, and a connection made before the guest's network is up only
        completes with QEMU's next SYN to it."""
        sock = socket.create_connection((HOST, node.connection_port), timeout=10)
        transport = paramiko.Transport(sock)
        transport.set_log_channel(POLL_LOG)
        transport.banner_timeout = 20
        transport.auth_timeout = 60
        try:
            transport.start_client(timeout=60)
            offered = transport.get_remote_server_key()
            if f"{offered.get_name()} {offered.get_base64()}" != node.host_keys[0]:
                raise LaunchError(
                    f"Node {node.id}: {HOST}:{node.connection_port} answers with another "
                    f"host key ({offered.get_name()} {offered.get_base64()})."
                )
            transport.auth_publickey(node.username, key)
        finally:
            transport.close()

    def _check_kvm(self, node: Node, booted: float) -> None:
        """Raise KvmFailed when QEMU reports that KVM cannot run the guest, or
        the guest has printed nothing KVM_SILENCE seconds after QEMU started."""
        qemu_log = self._qemu_log(node)
        for line in qemu_log.splitlines():
            if any(failure in line for failure in KVM_FAILURES):
                raise KvmFailed(line.strip())
        try:
            silent = Path(node.console_log or "").stat().st_size == 0
        except OSError:
            silent = True
        if silent and time.monotonic() - booted > KVM_SILENCE:
            raise KvmFailed(f"no console output {KVM_SILENCE:.0f}s after QEMU started")

    def _qemu_log(self, node: Node) -> str:
        try:
            return (self.node_dir(node.id or "") / "qemu.log").read_text(errors="replace")
        except OSError:
            return ""

    def _console_tail(self, node: Node) -> str:
        try:
            text = Path(node.console_log or "").read_text(errors="replace")
        except OSError:
            return "(no console log)"
        return " | ".join(text.strip().splitlines()[-5:])

    # What runs -------------------------------------------------------------

    def qemu_pids(self) -> dict[str, list[int]]:
        return qemu_pids(self.nodes_dir)

    def node_alive(self, node: Node) -> bool:
        return bool(node.id and self.qemu_pids().get(node.id))

    def leaked_node_ids(self) -> list[str]:
        return sorted(qemu_nodes(self.nodes_dir))

    def cleanup_node(self, node_id: str) -> None:
        """Kill its QEMU (ours or a predecessor's), then delete its overlay and keys."""
        for pid in self.qemu_pids().get(node_id, []):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        with self._lock:
            proc = self._procs.pop(node_id, None)
        if proc is not None:
            proc.wait()
        # A predecessor's QEMU is not our child: its pidfd says when it exits.
        pids = self.qemu_pids().get(node_id, [])
        wait_exited(set(pids), time.monotonic() + 10)
        if any(not process_gone(p) for p in pids):
            raise LaunchError(f"Node {node_id}: QEMU still runs after SIGKILL.")
        shutil.rmtree(self.node_dir(node_id), ignore_errors=True)
        self._prune_consoles()
        log.info("Node %s destroyed", node_id)

    def _prune_consoles(self) -> None:
        consoles = sorted(self.consoles_dir.glob("*.log"), key=os.path.getmtime)
        for old in consoles[:-KEEP_CONSOLES]:
            old.unlink(missing_ok=True)


class QemuRequestHandler(RequestHandler):
    provider: QemuProvider
    pool: QemuPool

    def ready(self, labels: list[str]) -> bool:
        """Labels wait for the builder's first upload of their image."""
        return all(self.provider.image(self.pool.labels[label]) for label in labels)

    def launch(self, node: Node) -> None:
        self.provider.launch(node, self.pool)
