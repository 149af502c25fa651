"""The scheduler's side of Gearman: the embedded server and the build client.

gear 0.16 never sets TCP_NODELAY, so every small packet waits on Nagle and the
peer's delayed ACK (~45 ms per submit→complete on loopback instead of <1 ms).
We set it on each socket through gear's own hooks instead of patching `socket`.

With TLS (zuul.yaml `gearman: tls:` and `server-tls:`) the server lets in only
clients with a certificate from our CA, and the client presents its own.
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

import gear

from nodepool_lite.tls import TLSFiles, gear_args
from zuul_lite.build_contract import BuildRequest

log = logging.getLogger("zuul_lite.gearman")

EXECUTE = "launcher:execute"
HANDSHAKE_TIMEOUT = 10.0  # seconds a new connection has to complete its TLS handshake


def _nodelay(conn: Any) -> None:
    sock = getattr(conn, "conn", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            log.debug("Could not set TCP_NODELAY on %s", conn)


def _server_context(tls: TLSFiles) -> ssl.SSLContext:
    """gear's own context (TLS 1.3 off, as in its clients), demanding a client certificate."""
    context = gear.create_ssl_context()
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(tls.cert, tls.key)
    context.load_verify_locations(tls.ca)
    return context


class GearServer(gear.Server):
    """gear.Server with TCP_NODELAY on every accepted connection and, given
    `tls`, TLS that requires a client certificate signed by `tls.ca`.

    gear does its TLS handshake inside its one accept loop, blocking and
    without a timeout: a peer that connects and sends nothing would hold up
    every later connection, and each refused handshake costs a traceback and
    a second's pause. So the accept loop below hands each handshake to a
    thread of its own with a timeout, and the context is built once.
    """

    def __init__(self, port: int = 4730, host: str = "127.0.0.1", tls: TLSFiles | None = None):
        ssl_args = gear_args(tls)  # checks the files: one sentence now, not an error per accept
        # Set before gear's __init__ starts the accept thread, which reads it.
        self._tls_context = _server_context(tls) if tls is not None else None
        super().__init__(port=port, host=host, statsd_host=None, **ssl_args)

    def connectLoop(self) -> None:  # noqa: N802 (gear's name; its loop but for the handshake)
        poll = select.poll()
        bitmask = select.POLLIN | select.POLLERR | select.POLLHUP | select.POLLNVAL
        poll.register(self.connect_wake_read, bitmask)
        poll.register(self.socket.fileno(), bitmask)
        while self.running:
            for fd, event in poll.poll():
                if fd == self.connect_wake_read:  # shutdown
                    while os.read(self.connect_wake_read, 1) != b"\n":
                        pass
                    return
                if event & select.POLLIN:
                    sock, addr = self.socket.accept()
                    if self._tls_context is None:
                        self._accept(sock, addr)
                    else:
                        threading.Thread(
                            target=self._handshake,
                            args=(self._tls_context, sock, addr),
                            name="gear-tls-handshake",
                            daemon=True,
                        ).start()

    def _handshake(self, context: ssl.SSLContext, sock: socket.socket, addr: Any) -> None:
        sock.settimeout(HANDSHAKE_TIMEOUT)
        try:
            tls_sock = context.wrap_socket(sock, server_side=True)
        except OSError as error:  # ssl.SSLError, a timeout, a reset
            log.warning("Refused a Gearman connection from %s: %s", addr[0], error)
            sock.close()
            return
        self._accept(tls_sock, addr)

    def _accept(self, sock: socket.socket, addr: Any) -> None:
        if not self.running:  # a handshake that ended after shutdown()
            sock.close()
            return
        conn = gear.ServerConnection(addr, sock, self.use_ssl, self.client_id)
        log.debug("Accepted %s", conn)
        with self.connections_condition:
            self.active_connections.append(conn)
            self._registerConnection(conn)
            self.connections_condition.notify_all()

    def _registerConnection(self, conn: Any) -> None:  # noqa: N802 (gear's name)
        _nodelay(conn)
        super()._registerConnection(conn)


class BuildClient(gear.Client):
    """Submits builds to `launcher:execute`.

    A result reaches the scheduler once, through ZooKeeper, where the launcher
    stores it before WORK_COMPLETE; gearman only tells us about builds that
    failed without a result (WORK_FAIL: the launcher went away or refused the
    arguments), through `on_failed`, which runs on gear's thread and must only
    post an event to the scheduler.
    """

    def __init__(
        self,
        on_failed: Callable[[str, str], None],
        on_status: Callable[[str, dict], None] | None = None,
    ) -> None:
        super().__init__(client_id="zuul-lite-scheduler")
        self.on_failed = on_failed
        self.on_status = on_status
        self.jobs: dict[str, gear.Job] = {}
        self.stop_functions: dict[str, str] = {}  # build uuid -> its launcher's stop job

    def _onActiveConnection(self, conn: Any) -> None:  # noqa: N802
        _nodelay(conn)
        super()._onActiveConnection(conn)

    def submit_build(self, request: BuildRequest, timeout: float = 30.0) -> None:
        job = gear.TextJob(EXECUTE, json.dumps(request.to_dict()), unique=request.uuid)
        self.jobs[job.unique] = job
        self.submitJob(job, timeout=timeout)

    def cancel_build(self, uuid: str) -> None:
        """Take a queued build out of gearman, or ask the launcher running it to stop."""
        job = self.jobs.get(uuid)
        stop = self.stop_functions.get(uuid)
        if stop is not None:
            self.submitJob(gear.TextJob(stop, json.dumps({"uuid": uuid})), background=True)
            log.info("Asked %s to stop build %s", stop, uuid)
        elif job is not None and job.handle and job.connection is not None:
            try:
                job.connection.sendAdminRequest(gear.CancelJobAdminRequest(job.handle), 10)
            except gear.GearmanError:
                log.debug("Build %s already taken; it will finish on its own", uuid)

    def _finish(self, job: gear.Job) -> None:
        self.jobs.pop(job.unique, None)
        self.stop_functions.pop(job.unique, None)

    def handleWorkComplete(self, packet: Any) -> gear.Job:  # noqa: N802
        job = super().handleWorkComplete(packet)
        self._finish(job)
        return job

    def handleWorkFail(self, packet: Any) -> gear.Job:  # noqa: N802
        job = super().handleWorkFail(packet)
        self._finish(job)
        self.on_failed(job.unique, "the launcher failed the job")
        return job

    def handleWorkException(self, packet: Any) -> gear.Job:  # noqa: N802
        job = super().handleWorkException(packet)
        self._finish(job)
        detail = job.exception.decode("utf-8", "replace") if job.exception else ""
        self.on_failed(job.unique, f"the launcher refused it: {detail}".rstrip(": "))
        return job

    def handleWorkData(self, packet: Any) -> gear.Job:  # noqa: N802
        job = super().handleWorkData(packet)
        try:
            data = json.loads(job.data[-1])
        except (ValueError, IndexError):
            return job
        if isinstance(data, dict) and data.get("stop"):
            self.stop_functions[job.unique] = data["stop"]
        return job

    def handleWorkStatus(self, packet: Any) -> gear.Job:  # noqa: N802
        job = super().handleWorkStatus(packet)
        if self.on_status is not None:
            self.on_status(
                job.unique, {"numerator": job.numerator, "denominator": job.denominator}
            )
        return job

    def handleDisconnect(self, job: gear.Job) -> gear.Job:  # noqa: N802
        """A lost server connection loses the job's handle, not the build:
        the launcher also stores the result in ZooKeeper, so we wait for that."""
        log.warning("Lost gearman connection while build %s was running", job.unique)
        self.jobs.pop(job.unique, None)
        return job
