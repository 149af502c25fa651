"""Forwarding a host port into a network namespace that has only its own loopback
(how the launcher reaches a container node that can reach nothing)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest

from nodepool_lite.drivers.netns import Forward
from nodepool_lite.zkserver import free_port

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

# An echo server on 127.0.0.1:PORT of a new network namespace; it tells the
# host whether it can reach the host's loopback port given as argv[2].
SERVER = textwrap.dedent(
    """
    import socket, subprocess, sys, threading
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[2])), 1).close()
        reach = "reached the host"
    except OSError:
        reach = "isolated"
    srv = socket.socket()
    srv.bind(("127.0.0.1", int(sys.argv[1])))
    srv.listen()
    print(reach, flush=True)
    def echo(conn):
        while data := conn.recv(4096):
            conn.sendall(data)
        conn.close()
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=echo, args=(conn,), daemon=True).start()
    """
)


@pytest.fixture
def namespace():
    host_service = socket.socket()
    host_service.bind(("127.0.0.1", 0))
    host_service.listen()
    proc = subprocess.Popen(
        ["unshare", "--net", "--", sys.executable, "-c", SERVER, "2222",
         str(host_service.getsockname()[1])],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        yield proc, proc.stdout.readline().strip()
    finally:
        proc.kill()
        proc.wait()
        host_service.close()


def _echo(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), 5) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while data := sock.recv(65536):
            received += data
        return received


def test_forward_reaches_only_the_namespace_port(namespace):
    proc, reach = namespace
    assert reach == "isolated"  # the host's loopback is not the namespace's
    forward = Forward(proc.pid, 2222)
    try:
        assert _echo(forward.port, b"hello") == b"hello"
        big = os.urandom(3 * 1024 * 1024)
        assert _echo(forward.port, big) == big  # both directions, end of stream
        # The process itself stayed in the host's namespace.
        with socket.create_connection(("127.0.0.1", forward.port), 5):
            pass
    finally:
        forward.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", forward.port), 1).close()


def test_forward_on_a_given_port_and_close_cuts_connections(namespace):
    proc, _ = namespace
    port = free_port()
    forward = Forward(proc.pid, 2222, port=port)
    assert forward.port == port
    sock = socket.create_connection(("127.0.0.1", port), 5)
    sock.sendall(b"x")
    assert sock.recv(1) == b"x"
    forward.close()
    sock.settimeout(5)
    assert sock.recv(1) == b""  # cut, not left hanging
    sock.close()


def test_nothing_listens_in_the_namespace(namespace):
    proc, _ = namespace
    forward = Forward(proc.pid, 2223)  # no server on that port in the namespace
    try:
        with socket.create_connection(("127.0.0.1", forward.port), 5) as sock:
            sock.settimeout(5)
            assert sock.recv(1) == b""  # accepted, then closed at once
    finally:
        forward.close()
