"""Reaching a node that has no network but its own loopback.

A container node runs in a network namespace of its own holding only `lo`
(systemd-nspawn --private-network): nothing in it can reach an address of the
host, a service on the host's loopback (ZooKeeper, Gearman, the web) or
another node. The one way in is a port on the host that this module forwards
to a port on the node's loopback: for each connection, a short-lived thread
enters the node's namespace (setns(2) changes only the calling thread), opens
the connection there and leaves; the socket stays in the node's namespace.
The launcher's ssh and Ansible connect to the forwarded port as to any host.

Each node's forward runs as a small process of its own (`python -m
nodepool_lite.drivers.netns`), in its own session, that ends when the node's
container does: a nodepool launcher that dies or restarts cuts no build's ssh
connection, and a restarted one finds the forward by its command line.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import select
import socket
import subprocess
import sys
import threading
from pathlib import Path

from nodepool_lite.drivers import process_argvs

log = logging.getLogger("nodepool_lite.drivers.netns")

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_BUFFER = 65536


def connect_in_namespace(netns: int, port: int, timeout: float = 5.0) -> socket.socket:
    """A TCP connection to 127.0.0.1:`port` inside the network namespace open as fd `netns`."""
    result: dict[str, object] = {}

    def enter_and_connect() -> None:
        # The thread ends right after: nothing else ever runs in the namespace.
        try:
            if _libc.setns(netns, CLONE_NEWNET) != 0:
                errno = ctypes.get_errno()
                raise OSError(errno, f"setns: {os.strerror(errno)}")
            result["sock"] = socket.create_connection(("127.0.0.1", port), timeout)
        except OSError as error:
            result["error"] = error

    thread = threading.Thread(target=enter_and_connect, name="netns-connect", daemon=True)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    sock = result["sock"]
    assert isinstance(sock, socket.socket)
    sock.settimeout(None)
    return sock


class _Connection:
    """One forwarded connection: two pumps; the second to end closes both sockets."""

    def __init__(self, client: socket.socket, node: socket.socket) -> None:
        self.sockets = (client, node)
        self._running = 2
        self._lock = threading.Lock()

    def start(self, name: str) -> None:
        client, node = self.sockets
        for source, sink in ((client, node), (node, client)):
            threading.Thread(
                target=self._pump, args=(source, sink), name=name, daemon=True
            ).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(_BUFFER):
                sink.sendall(data)
        except OSError:
            pass
        try:
            sink.shutdown(socket.SHUT_WR)  # the other side sees the end of this direction
        except OSError:
            pass
        with self._lock:
            self._running -= 1
            last = self._running == 0
        if last:
            self.close()

    def close(self) -> None:
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


class Forward:
    """host:port -> 127.0.0.1:target in the namespace of process `pid`, until `close()`."""

    def __init__(self, pid: int, target: int, host: str = "127.0.0.1", port: int = 0) -> None:
        # Holding the namespace open keeps it alive only as long as we forward.
        self._netns = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self.target = target
        self._listener = socket.socket()
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind((host, port))
            self._listener.listen(16)
        except OSError:
            self._listener.close()
            os.close(self._netns)
            raise
        self.host, self.port = self._listener.getsockname()[:2]
        self._lock = threading.Lock()
        self._open: set[_Connection] = set()
        self._closed = False
        threading.Thread(target=self._accept, name=f"forward-{self.port}", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                node = connect_in_namespace(self._netns, self.target)
            except OSError as error:
                log.debug("Port %s: no connection to the node (%s)", self.port, error)
                client.close()
                continue
            connection = _Connection(client, node)
            with self._lock:
                if self._closed:
                    connection.close()
                    return
                self._open = {c for c in self._open if c._running} | {connection}
            connection.start(f"forward-{self.port}")

    def close(self) -> None:
        """Stop listening and cut every forwarded connection."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            connections, self._open = self._open, set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        for connection in connections:
            connection.close()
        os.close(self._netns)


def forward_pids(node_dir: Path) -> list[int]:
    """The forward processes serving the node whose directory is `node_dir`."""
    mark = os.fsencode(str(node_dir))
    return [
        pid
        for pid, argv in process_argvs()
        if b"nodepool_lite.drivers.netns" in argv[:3] and mark in argv
    ]


def start_forward(node_dir: Path, pid: int, target: int, host: str, port: int = 0) -> int:
    """Start the forward process of a node (its container runs `pid`); returns
    the port it listens on, once it does."""
    with open(node_dir / "forward.log", "ab") as errors:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nodepool_lite.drivers.netns", "--node", str(node_dir),
             "--pid", str(pid), "--target", str(target), "--host", host, "--port", str(port)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors,
            start_new_session=True,
        )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    proc.stdout.close()
    if not line.strip().isdigit():
        proc.wait()
        tail = (node_dir / "forward.log").read_text(errors="replace").strip().splitlines()[-1:]
        raise OSError(f"the ssh port of {node_dir.name} was not forwarded: {' '.join(tail)}")
    # Not waited for here: it outlives this process; init reaps it then.
    threading.Thread(target=proc.wait, name="forward-reaper", daemon=True).start()
    return int(line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Forward a host port into a node.")
    parser.add_argument("--node", required=True, help="the node's directory (to find us)")
    parser.add_argument("--pid", type=int, required=True, help="a process of the container")
    parser.add_argument("--target", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        container = os.pidfd_open(args.pid)
        forward = Forward(args.pid, args.target, host=args.host, port=args.port)
    except OSError as error:
        print(f"cannot forward {args.host}:{args.port}: {error}", file=sys.stderr)
        return 1
    print(forward.port, flush=True)
    select.select([container], [], [])  # until the container's process ends
    forward.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
