"""What the nodepool launcher asks of a provider, and how it picks one.

The launcher owns requests, states and ZooKeeper records; a driver only turns
a Node record into a running machine and back into nothing. Keeping that
boundary small is what lets reconciliation after a crash work the same way
for every driver: ask it which nodes still run and which resources are leaked.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path

from nodepool_lite import config as npconfig
from nodepool_lite.exceptions import ConfigError
from nodepool_lite.model import Node
from nodepool_lite.zk import ZooKeeper


def process_argvs() -> Iterator[tuple[int, list[bytes]]]:
    """(pid, argv) of every process on this host: how a restarted launcher
    finds what its predecessor started (containers, forwards) without pid files."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        yield int(entry), argv


def ensure_keypair(state_dir: Path) -> Path:
    """The ssh key every node authorises: `<state>/keys/id_ed25519{,.pub}`;
    zuul-launcher logs in with the private half. Returns the private key path."""
    keys = Path(state_dir) / "keys"
    private = keys / "id_ed25519"
    if private.exists():
        return private
    keys.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(keys / ".lock", "w") as lock:
        # Another process (a second daemon, the quick start) may be making it.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not private.exists():
            tmp = keys / f".id_ed25519.{os.getpid()}"
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "zuul-lite", "-f", tmp],
                check=True, stdin=subprocess.DEVNULL,
            )  # fmt: skip
            os.replace(f"{tmp}.pub", f"{private}.pub")  # public half first: readers
            os.replace(tmp, private)  # test for the private one
    return private


class Provider(ABC):
    """One configured provider. Methods are called from several threads."""

    def __init__(self, provider: npconfig.Provider, state_dir: Path, zk: ZooKeeper):
        self.provider = provider
        self.state_dir = Path(state_dir)
        self.zk = zk

    def labels_ready(self, pool: npconfig.Pool, labels: list[str]) -> bool:
        """Can `labels` be launched now (e.g. their image is built)? A False
        leaves the request queued instead of failing it."""
        return True

    @abstractmethod
    def launch(self, node: Node, pool: npconfig.Pool) -> None:
        """Boot `node` (its id is set) and fill in how to reach it; raise
        LaunchError after cleaning up what was half made."""

    @abstractmethod
    def cleanup_node(self, node_id: str) -> None:
        """Destroy everything of `node_id`; idempotent, safe on half-built nodes."""

    @abstractmethod
    def node_alive(self, node: Node) -> bool:
        """Does the machine behind `node` still run (used to adopt it on restart)?"""

    def adopt(self, node: Node) -> bool:
        """Take over a node a previous launcher started, if it still runs
        (what the provider keeps in memory for a node is made again here)."""
        return self.node_alive(node)

    @abstractmethod
    def leaked_node_ids(self) -> list[str]:
        """Ids of every node this provider has resources for, known to ZK or not."""


def get_provider(provider: npconfig.Provider, state_dir: Path, zk: ZooKeeper) -> Provider:
    if provider.driver == "nspawn":
        from nodepool_lite.drivers.nspawn import NspawnProvider

        return NspawnProvider(provider, state_dir, zk)
    if provider.driver == "static":
        from nodepool_lite.drivers.static import StaticProvider

        return StaticProvider(provider, state_dir, zk)
    raise ConfigError(f"Provider {provider.name}: unknown driver {provider.driver!r}.")
