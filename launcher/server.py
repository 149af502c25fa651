"""LauncherServer: the gear worker for `launcher:execute`, one thread per build.

`max-builds` threads each block in getJob(); gear only grabs a job for a
thread that waits, so at most that many builds run at once. Running builds
are stopped through a second worker registered as `launcher:stop:<name>`
(Zuul 2.5's `stop:<worker>`): its own connection and thread, so a stop
arrives even while every build thread is busy. The first WORK_DATA of each
build names that function, so the scheduler knows where to send the stop.

Stopping the launcher (SIGTERM, a restart) is not a verdict on any change:
its running builds are abandoned (see Build.abandon) and their gear jobs
failed with WORK_FAIL, so the scheduler runs them again on a new node. Only a
stop through `launcher:stop:<name>` ends a build ABORTED.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import gear

from launcher.ansible import OutputLog
from launcher.build import Build, BuildAbandoned
from launcher.config import LauncherConfig
from launcher.console import ConsoleServer
from launcher.gearworker import NoDelayWorker
from launcher.metrics import LauncherMetrics
from nodepool_lite.tls import gear_args
from nodepool_lite.zk import ZooKeeper
from zuul_lite.build_contract import BuildRequest, ContractError
from zuul_lite.state import ZuulState

EXECUTE = "launcher:execute"
STOP_PREFIX = "launcher:stop:"
REWAKE = 0.5  # seconds between wake-ups of idle build threads while stopping

log = logging.getLogger("launcher.server")


class LauncherServer:
    """start() / stop() / join(); builds run on `max_builds` threads."""

    def __init__(self, config: LauncherConfig, zk: ZooKeeper | None = None) -> None:
        self.config = config
        self.zk = zk or ZooKeeper(config.zk_hosts, tls=config.zk_tls)
        self._own_zk = zk is None
        self.state = ZuulState(self.zk)
        self.zk.add_connection_listener(self._on_zk_state)
        self.stop_function = STOP_PREFIX + config.name
        self.worker = NoDelayWorker(client_id=f"zuul-launcher-{config.name}")
        self.stop_worker = NoDelayWorker(client_id=f"zuul-launcher-{config.name}-stop")
        self.builds: dict[str, Build] = {}
        self._builds_lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self.metrics = LauncherMetrics(lambda: len(self.builds))
        self.metrics_server = (
            config.metrics.server(self.metrics.registry) if config.metrics else None
        )
        self.console = ConsoleServer(
            self._output_of, config.console_listen, config.console_port, config.console_host
        )

    def start(self) -> None:
        """Connect to ZooKeeper and gearman and start taking builds."""
        if self.metrics_server is not None:
            self.metrics_server.start()
        self.zk.connect()
        self.console.start()
        tls = gear_args(self.config.gearman_tls)
        for worker in (self.worker, self.stop_worker):
            worker.addServer(self.config.gearman_server, self.config.gearman_port, **tls)
        self.worker.registerFunction(EXECUTE)
        self.stop_worker.registerFunction(self.stop_function)
        for index in range(self.config.max_builds):
            self._spawn(self._serve, f"launcher-build-{index}")
        self._spawn(self._serve_stops, "launcher-stop")
        log.info(
            "Launcher %s taking up to %s builds from %s:%s",
            self.config.name,
            self.config.max_builds,
            self.config.gearman_server,
            self.config.gearman_port,
        )

    def _spawn(self, target: Any, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        """Take no new builds; abandon the running ones, which the scheduler runs again."""
        log.info("Stopping launcher %s", self.config.name)
        self._stopping.set()
        self.worker.setFunctions([])
        with self._builds_lock:
            running = list(self.builds.values())
        for build in running:
            build.abandon()
        for worker in (self.worker, self.stop_worker):
            worker.stopWaitingForJobs()

    def join(self, timeout: float | None = None) -> None:
        """Wait for build threads to finish, then close the gearman connections.

        gear's stopWaitingForJobs() wakes only the threads already waiting in
        getJob(); one that finished its build (or checked `_stopping`) just
        before would wait there for good, so idle threads are woken again
        until every thread is gone.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            while thread.is_alive():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                thread.join(REWAKE if left is None else min(REWAKE, left))
                for worker in (self.worker, self.stop_worker):
                    worker.stopWaitingForJobs()
        self.worker.shutdown()
        self.stop_worker.shutdown()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        self.console.stop()
        if self._own_zk:
            self.zk.disconnect()

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                job = self.worker.getJob()
            except gear.InterruptedError:
                continue
            if self._stopping.is_set():
                job.sendWorkFail()
                return
            self._execute(job)

    def _output_of(self, uuid: str) -> OutputLog | None:
        with self._builds_lock:
            build = self.builds.get(uuid)
        return build.output if build is not None else None

    def _on_zk_state(self, state: str) -> None:
        """From kazoo's thread: pass the state on to the running builds (non-blocking)."""
        (log.info if state == "CONNECTED" else log.warning)("ZooKeeper connection %s", state)
        with self._builds_lock:
            running = list(self.builds.values())
        for build in running:
            build.on_connection(state)

    def _execute(self, job: gear.WorkerJob) -> None:
        try:
            request = BuildRequest.from_dict(_json(job.arguments))
            build = Build(
                self.config,
                self.state,
                request,
                lambda *s: self._status(job, build, *s),
                self.console.address,
            )
        except ValueError as error:  # ContractError, or a log_path that leaves the log root
            sentence = str(error)[:1].upper() + str(error)[1:]
            log.error("Refusing a build: %s", sentence)
            job.sendWorkException(sentence.encode())
            return
        with self._builds_lock:
            self.builds[build.uuid] = build
            if self._stopping.is_set():  # stop() listed the builds before this one
                build.abandon()
        try:
            result = build.run()
            self.metrics.build_finished(request.job, result.result, result.elapsed)
            job.sendWorkComplete(json.dumps(result.to_dict()).encode())
        except BuildAbandoned:
            self._send_safely(job.sendWorkFail)
        except Exception as error:
            build.log.exception("Failed inside the launcher")
            self._send_safely(job.sendWorkException, f"Launcher error: {error}".encode())
        finally:
            with self._builds_lock:
                self.builds.pop(build.uuid, None)
            build.output.finish()

    def _status(
        self, job: gear.WorkerJob, build: Build, phase: str, step: int, steps: int
    ) -> None:
        """WORK_DATA with the phase (and where to stop us), WORK_STATUS with step/steps."""
        data = {
            "phase": phase,
            "launcher": self.config.name,
            "stop": self.stop_function,
            "uuid": build.uuid,
            "log_url": build.log_url,
        }
        self._send_safely(job.sendWorkData, json.dumps(data).encode())
        self._send_safely(job.sendWorkStatus, step, steps)

    @staticmethod
    def _send_safely(send: Any, *args: Any) -> None:
        """A lost gearman connection must not kill the build: the result is in ZK."""
        try:
            send(*args)
        except Exception as error:  # gear raises plain socket errors as well as its own
            log.warning("Could not send %s: %s", getattr(send, "__name__", send), error)

    def _serve_stops(self) -> None:
        while not self._stopping.is_set():
            try:
                job = self.stop_worker.getJob()
            except gear.InterruptedError:
                continue
            self._stop_build(job)

    def _stop_build(self, job: gear.WorkerJob) -> None:
        try:
            uuid = json.loads(job.arguments).get("uuid")
        except (ValueError, AttributeError):
            uuid = None
        with self._builds_lock:
            build = self.builds.get(uuid or "")
        if build is not None:
            build.cancel()
        job.sendWorkComplete(json.dumps({"uuid": uuid, "cancelled": build is not None}).encode())


def _json(arguments: bytes) -> object:
    try:
        return json.loads(arguments)
    except ValueError:
        raise ContractError("the build arguments are not JSON.") from None
