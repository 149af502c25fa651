"""Gerrit's ssh interface: commands (`gerrit query`, `gerrit review`) and the
`gerrit stream-events` watcher, both over paramiko.

Commands share one ssh connection, opened again when it drops; the watcher has
its own, and reconnects with capped exponential backoff, because Gerrit drops
long-lived streams (restarts, load balancers) and nothing tells us what we
missed meanwhile: `on_connected` runs after every (re)connect so the
connection can resync.
"""

from __future__ import annotations

import json
import logging
import shlex
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import paramiko

from zuul_lite.exceptions import ReviewSystemError

log = logging.getLogger("zuul_lite.connections.gerrit")

# Errors of the ssh transport (as opposed to a command Gerrit refused).
TRANSPORT_ERRORS = (paramiko.SSHException, OSError, EOFError)


class GerritError(ReviewSystemError):
    """Gerrit refused a command; the message is its first line of stderr."""


@dataclass(frozen=True, slots=True)
class SshTarget:
    server: str
    port: int
    user: str
    key: Path
    known_hosts: Path | None = None
    keepalive: int = 60
    timeout: float = 30.0

    def client(self) -> paramiko.SSHClient:
        """A connected client; an unknown host key is refused, never trusted."""
        client = paramiko.SSHClient()
        if self.known_hosts is not None:
            client.load_host_keys(str(self.known_hosts))
        else:
            client.load_system_host_keys()
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            client.connect(
                self.server,
                port=self.port,
                username=self.user,
                key_filename=str(self.key),
                timeout=self.timeout,
                banner_timeout=self.timeout,
                auth_timeout=self.timeout,
                allow_agent=False,
                look_for_keys=False,
            )
            transport = client.get_transport()
            assert transport is not None
            transport.set_keepalive(self.keepalive)
        except BaseException:
            client.close()
            raise
        return client


def quote(*words: str) -> str:
    """A command line Gerrit splits back into `words` (it splits as a shell does)."""
    return " ".join(shlex.quote(w) for w in words)


class GerritSsh:
    """Runs Gerrit commands over one shared ssh connection."""

    def __init__(self, target: SshTarget, retries: int = 5, backoff: float = 1.0) -> None:
        self.target = target
        self.retries = retries
        self.backoff = backoff
        self._client: paramiko.SSHClient | None = None
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def _run_once(self, command: str) -> str:
        with self._lock:
            if self._client is None:
                self._client = self.target.client()
            try:
                _, stdout, stderr = self._client.exec_command(command, timeout=self.target.timeout)
                with stdout.channel:
                    out = stdout.read()
                    err = stderr.read()
                    status = stdout.channel.recv_exit_status()
            except BaseException:
                self._client.close()
                self._client = None
                raise
        if status == -1:  # no exit status: the connection went away first
            raise paramiko.SSHException("the connection closed before the command ended")
        if status != 0:
            first = (err.decode("utf-8", "replace").strip().splitlines() or ["no message"])[0]
            raise GerritError(f"Gerrit refused {command.split(' --')[0]}: {first}")
        return out.decode("utf-8", "replace")

    def run(self, command: str, done: Callable[[], bool] | None = None) -> str:
        """Run `command`; transport errors are retried with backoff, GerritError
        is not. `done` says whether an attempt whose answer was lost took effect
        (checked before each retry, so a vote is not left twice)."""
        delay = self.backoff
        for attempt in range(1, self.retries + 1):
            try:
                if attempt > 1 and done is not None and done():
                    return ""
                return self._run_once(command)
            except TRANSPORT_ERRORS as error:
                if attempt == self.retries:
                    raise GerritError(
                        f"Cannot reach Gerrit at {self.target.server}:{self.target.port} "
                        f"({error or type(error).__name__})."
                    ) from error
                log.warning(
                    "ssh to %s failed (%s); retry %d in %.1f s",
                    self.target.server,
                    error or type(error).__name__,
                    attempt,
                    delay,
                )
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
        raise AssertionError("unreachable")

    def query(self, query: str, *options: str) -> list[dict]:
        """Every change `gerrit query --format JSON` finds, page after page
        (Gerrit stops at its query limit and says moreChanges); ValueError if
        a line is not a JSON object."""
        found: list[dict] = []
        while True:
            start = ["--start", str(len(found))] if found else []
            out = self.run(
                "gerrit query --format JSON " + quote(*options, *start) + " " + quote(query)
            )
            more = False
            page = 0
            for line in out.splitlines():
                if not line.strip():
                    continue
                data = json.loads(line)
                if not isinstance(data, dict):
                    raise ValueError(f"not a JSON object: {line[:200]}")
                if data.get("type") == "stats":
                    more = bool(data.get("moreChanges"))
                elif data.get("type") == "error":
                    raise GerritError(f"Gerrit query {query} failed: {data.get('message')}")
                else:
                    found.append(data)
                    page += 1
            if not more or page == 0:
                return found


class StreamWatcher(threading.Thread):
    """Reads `gerrit stream-events` and hands each JSON object to `on_event`;
    malformed lines are logged and skipped, a lost stream is opened again."""

    def __init__(
        self,
        target: SshTarget,
        on_event: Callable[[dict], None],
        on_connected: Callable[[], None],
        name: str,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
    ) -> None:
        super().__init__(name=f"gerrit-watcher-{name}", daemon=True)
        self.target = target
        self.on_event = on_event
        self.on_connected = on_connected
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.stop_event = threading.Event()
        self._client: paramiko.SSHClient | None = None
        self._heard = False  # a line came since the last connect: the backoff starts over

    def stop(self) -> None:
        self.stop_event.set()
        client = self._client
        if client is not None:
            client.close()

    def run(self) -> None:
        delay = self.backoff
        while not self.stop_event.is_set():
            self._heard = False
            try:
                self._stream()
                why = "the stream ended"
            except GerritError as error:
                why = str(error)
            except TRANSPORT_ERRORS as error:
                why = f"{type(error).__name__}: {error}"
            except Exception as error:  # the watcher never dies of one surprise
                log.exception("Event stream from %s failed", self.target.server)
                why = repr(error)
            finally:
                if self._client is not None:
                    self._client.close()
                    self._client = None
            if self.stop_event.is_set():
                return
            if self._heard:
                delay = self.backoff
            log.warning(
                "Event stream from %s lost (%s); reconnecting in %.1f s",
                self.target.server,
                why,
                delay,
            )
            self.stop_event.wait(delay)
            delay = min(delay * 2, self.max_backoff)

    def _stream(self) -> None:
        """Read events until the stream ends."""
        self._client = self.target.client()
        transport = self._client.get_transport()
        assert transport is not None
        channel = transport.open_session()
        channel.exec_command("gerrit stream-events")
        channel.settimeout(1.0)  # so stop() is noticed
        buffer = b""
        opened = False  # Gerrit refuses the command only by ending it: open once it stays
        while not self.stop_event.is_set():
            try:
                data = channel.recv(65536)
            except TimeoutError:
                data = None
            if data == b"":
                break
            if not opened:
                opened = True
                log.info("Event stream from %s:%s open", self.target.server, self.target.port)
                self.on_connected()
            if data is None:
                continue
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                self._heard = True
                self._handle_line(line)
        if channel.exit_status_ready() and channel.recv_exit_status() not in (0, -1):
            err = channel.recv_stderr(4096).decode("utf-8", "replace").strip()
            raise GerritError(f"gerrit stream-events failed: {err or 'no message'}")

    def _handle_line(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            data = json.loads(line)
        except ValueError:
            log.warning("Skipped a malformed event line: %r", line[:200])
            return
        if not isinstance(data, dict):
            log.warning("Skipped an event that is not a JSON object: %r", line[:200])
            return
        self.on_event(data)
