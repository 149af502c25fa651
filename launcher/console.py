"""Live console: a running build's job-output.txt, streamed to whoever asks.

Zuul's executors stream logs the same way (the finger protocol on port 7900,
relayed by zuul-web): the launcher writes job-output.txt where it runs, which
on another host than the web server is out of the web's reach, so the web
connects here. The address is stored with the build's claim in ZooKeeper
(`ZuulState.claim_build`), so the web finds the launcher that runs a build.

Protocol: the client sends the build's uuid and a newline; the server sends
job-output.txt from its first byte and follows it until the build ends, then
closes the connection. A uuid this launcher does not run gets one line saying
so. The stream is what the published log will hold, nothing more: the same
bytes the log browser serves once the build ends.
"""

from __future__ import annotations

import logging
import re
import socket
import socketserver
import threading
from collections.abc import Callable
from pathlib import Path

from launcher.ansible import OutputLog

log = logging.getLogger("zuul_lite.launcher.console")

UUID = re.compile(r"[0-9a-f]{32}")
REQUEST_TIMEOUT = 10.0  # for the uuid line: a silent client is dropped
CHUNK = 65536
# How long a follower waits for a line before it checks that its client is
# still there; the wait ends at once when a line is written.
IDLE = 15.0


class NotRunning(Exception):
    pass


class _Handler(socketserver.BaseRequestHandler):
    server: _TCPServer

    def handle(self) -> None:
        conn: socket.socket = self.request
        conn.settimeout(REQUEST_TIMEOUT)
        try:
            uuid = self._read_uuid(conn)
            output = self.server.lookup(uuid)
            if output is None:
                raise NotRunning(f"Build {uuid} is not running on this launcher.")
            conn.settimeout(None)
            self._follow(conn, output)
        except NotRunning as why:
            self._say(conn, str(why))
        except OSError as error:  # the client went away: nothing to tell anyone
            log.debug("Console client %s: %s", self.client_address, error)

    @staticmethod
    def _read_uuid(conn: socket.socket) -> str:
        data = b""
        while b"\n" not in data and len(data) < 128:
            chunk = conn.recv(128)
            if not chunk:
                break
            data += chunk
        uuid = data.split(b"\n", 1)[0].strip().decode("ascii", "replace")
        if not UUID.fullmatch(uuid):
            raise NotRunning("Send a build uuid (32 hex digits) and a newline.")
        return uuid

    @staticmethod
    def _say(conn: socket.socket, sentence: str) -> None:
        try:
            conn.sendall(sentence.encode() + b"\n")
        except OSError:
            pass

    @staticmethod
    def _follow(conn: socket.socket, output: OutputLog) -> None:
        """Send the file, then each line as it is written, until the build ends."""
        path = Path(output.path)
        offset = 0
        while True:
            seen = output.lines  # before reading: a line written after is waited for
            finished = output.finished
            data = _read_from(path, offset)
            if data:
                conn.sendall(data)
                offset += len(data)
                continue
            if finished:
                return
            output.wait(seen, IDLE)
            if output.lines == seen and not output.finished and _gone(conn):
                return


def _gone(conn: socket.socket) -> bool:
    """Whether the client closed its end (it sends nothing after the uuid)."""
    try:
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False


def _read_from(path: Path, offset: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(CHUNK)
    except FileNotFoundError:  # the first line is not written yet
        return b""


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], lookup: Callable[[str], OutputLog | None]):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.lookup = lookup
        super().__init__(address, _Handler)


class ConsoleServer:
    """Serves the live console of the builds `lookup` knows, on `host:port`
    (port 0: a free one); `address` is what the build claims advertise."""

    def __init__(
        self,
        lookup: Callable[[str], OutputLog | None],
        listen: str = "127.0.0.1",
        port: int = 0,
        advertise: str | None = None,
    ) -> None:
        self.lookup = lookup
        self.listen = listen
        self.port = port
        self.advertise = advertise or listen
        self._server: _TCPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str | None:
        if self._server is None:
            return None
        host = f"[{self.advertise}]" if ":" in self.advertise else self.advertise
        return f"{host}:{self.port}"

    def start(self) -> None:
        """Listen; an address in use is one warning and no live console, not a
        launcher that does not start (builds matter more than watching them)."""
        try:
            self._server = _TCPServer((self.listen, self.port), self.lookup)
        except OSError as error:
            log.warning(
                "No live console: cannot listen on %s:%s (%s)",
                self.listen,
                self.port,
                error.strerror,
            )
            return
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="launcher-console", daemon=True
        )
        self._thread.start()
        log.info("Live console on %s", self.address)

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server = None
