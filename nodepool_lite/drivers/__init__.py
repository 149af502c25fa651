"""Node drivers (one package each, found through registry.py; the interface
is in base.py) and the helpers several of them share.

The launcher owns requests, states and ZooKeeper records; a driver only turns
a Node record into a running machine and back into nothing. Keeping that
boundary small is what lets reconciliation after a crash work the same way
for every driver: ask it which nodes still run and which resources are leaked.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path


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
