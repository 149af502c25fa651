"""The live console: the launcher's stream server and the web's relay, with
real sockets, a real ZooKeeper and the real uvicorn server on loopback."""

from __future__ import annotations

import socket
import threading
import uuid as uuidlib
from pathlib import Path

import httpx
import pytest

from launcher.ansible import OutputLog
from launcher.console import ConsoleServer
from nodepool_lite.zkserver import free_port
from zuul_lite.state import ZuulState


@pytest.fixture
def console(tmp_path: Path):
    outputs: dict[str, OutputLog] = {}
    server = ConsoleServer(outputs.get)
    server.start()
    yield server, outputs, tmp_path
    server.stop()


def ask(server: ConsoleServer, line: bytes) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    conn.sendall(line)
    return conn


def read_until(conn: socket.socket, text: bytes) -> bytes:
    data = b""
    while text not in data:
        chunk = conn.recv(4096)
        assert chunk, f"closed before {text!r}: {data!r}"
        data += chunk
    return data


def read_all(conn: socket.socket) -> bytes:
    data = b""
    while chunk := conn.recv(4096):
        data += chunk
    return data


def test_console_sends_what_was_written_then_follows_until_the_end(console):
    server, outputs, tmp = console
    build = uuidlib.uuid4().hex
    output = outputs[build] = OutputLog(tmp / "job-output.txt")
    output.write("before the client came")
    conn = ask(server, build.encode() + b"\n")
    assert b"before the client came" in read_until(conn, b"came\n")
    output.write("written while it follows")  # arrives without the client asking
    assert b"written while it follows" in read_until(conn, b"follows\n")
    output.write("last line")
    output.finish()
    assert b"last line" in read_all(conn)  # and the connection is closed


def test_console_before_the_first_line_waits_for_it(console):
    server, outputs, tmp = console
    build = uuidlib.uuid4().hex
    output = outputs[build] = OutputLog(tmp / "job-output.txt")  # no file yet
    conn = ask(server, build.encode() + b"\n")
    threading.Timer(0.2, output.write, ["first"]).start()
    assert b"first" in read_until(conn, b"first\n")
    output.finish()
    assert read_all(conn) == b""


@pytest.mark.parametrize(
    ("line", "answer"),
    [
        (b"0" * 32 + b"\n", b"Build " + b"0" * 32 + b" is not running on this launcher.\n"),
        (b"../../etc/passwd\n", b"Send a build uuid (32 hex digits) and a newline.\n"),
        (b"\x00" * 200, b"Send a build uuid (32 hex digits) and a newline.\n"),
    ],
)
def test_console_answers_a_bad_request_with_one_line(console, line, answer):
    server, _, _ = console
    assert read_all(ask(server, line)) == answer


def test_a_port_in_use_is_a_launcher_without_console(console, caplog):
    server, _, _ = console
    second = ConsoleServer(dict().get, port=server.port)
    second.start()
    assert second.address is None
    assert f"No live console: cannot listen on 127.0.0.1:{server.port}" in caplog.text


def test_web_relays_the_console_as_server_sent_events(zk, console, web):
    server, outputs, tmp = console
    build = uuidlib.uuid4().hex
    output = outputs[build] = OutputLog(tmp / "job-output.txt")
    output.write("make -j2")
    ZuulState(zk).claim_build(build, "l1", server.address)
    page = httpx.get(f"{web.url}/console/{build}")
    assert page.status_code == 200 and "EventSource" in page.text
    with httpx.stream("GET", f"{web.url}/api/console/{build}", timeout=30) as stream:
        lines = stream.iter_lines()
        assert next(lines).endswith("| make -j2") and next(lines) == ""
        output.write("  CC      kernel/fork.o\r")  # a CR would end an SSE line early
        output.finish()
        rest = list(lines)
    assert rest[0].startswith("data: ") and rest[0].endswith("CC      kernel/fork.o")
    assert rest[-3:] == ["event: end", "data: ", ""]


@pytest.mark.parametrize(
    "path",
    ["/api/console/" + "a" * 32, "/api/console/..%2f..%2fetc", "/api/console/%00", "/console/x"],
)
def test_web_console_of_no_running_build_is_404(web, path):
    reply = httpx.get(web.url + path)
    assert reply.status_code == 404
    assert "Traceback" not in reply.text


def test_web_console_of_a_launcher_gone_is_one_sentence(zk, web):
    build = uuidlib.uuid4().hex
    ZuulState(zk).claim_build(build, "l1", f"127.0.0.1:{free_port()}")
    reply = httpx.get(f"{web.url}/api/console/{build}")
    assert reply.status_code == 503
    assert reply.json()["detail"].startswith(f"The launcher running build {build} does not answer")
