"""One build: node, playbooks, logs, result; the launcher's AnsibleJob.

The flow (doc/architecture.md): an existing result is returned as is (the
scheduler re-submits after a restart); otherwise hold the ephemeral
`/zuul/builds/<uuid>/running`, get a node, run setup → pre → run → post →
collect-logs, give the node back, publish logs, store the result JSON and
only then return it for WORK_COMPLETE. Node trouble and pre-run failures are
retried on a fresh node, as Zuul does, up to `attempts`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from launcher import logs
from launcher.ansible import AnsibleRunner, Outcome, OutputLog
from launcher.config import LauncherConfig
from launcher.jobdir import JobDir
from launcher.nodes import NodeError, NodeRequestCancelled, NodeRequester
from launcher.playbooks import NodeAddress, PlaybookError, resolve_playbooks, write_ansible_dir
from nodepool_lite import exceptions as npexc
from nodepool_lite.zk import ZooKeeper

BUILDS_ROOT = "/zuul/builds"
STEPS = ("node", "setup", "pre", "run", "post", "collect")

StatusCallback = Callable[[str, int, int], None]


def result_path(uuid: str) -> str:
    return f"{BUILDS_ROOT}/{uuid}/result"


def running_path(uuid: str) -> str:
    return f"{BUILDS_ROOT}/{uuid}/running"


class BuildLog(logging.LoggerAdapter):
    """Prefixes `[build: <uuid>]`, so one grep follows a build through the launcher."""

    def process(self, msg: str, kwargs: dict) -> tuple[str, dict]:
        return f"[build: {self.extra['build']}] {msg}", kwargs


@dataclass(slots=True)
class Attempt:
    """How one attempt ended: a build result, or `retry` to try on a fresh node."""

    result: str
    summary: str = ""
    retry: bool = False
    collect: bool = True  # whether the node is usable enough to fetch its logs


class Build:
    """Runs one `launcher:execute` job; cancel() may be called from another thread."""

    def __init__(
        self, config: LauncherConfig, zk: ZooKeeper, args: dict, status: StatusCallback
    ) -> None:
        self.config = config
        self.zk = zk
        self.args = args
        self.uuid: str = args["uuid"]
        self.status = status
        self.log = BuildLog(logging.getLogger("launcher.build"), {"build": self.uuid})
        self.jobdir = JobDir(config.work_root, self.uuid)
        self.requester = NodeRequester(zk, f"{config.name}:{self.uuid}")
        self.runner: AnsibleRunner | None = None
        self.log_dir = logs.log_dir(config.log_root, args["log_path"])
        self.output = OutputLog(self.log_dir / "job-output.txt")
        self.cancelled = threading.Event()
        self.lost_reason: str | None = None
        self.records: list[dict] = []
        self._cancel_hooks: list[Callable[[], None]] = []

    @property
    def log_url(self) -> str:
        return f"{self.config.log_url.rstrip('/')}/{self.args['log_path'].strip('/')}/"

    def cancel(self) -> None:
        """Abort the build (scheduler cancel or launcher stop): kill ansible, free the node."""
        self.log.info("Cancelling")
        self.cancelled.set()
        for hook in self._cancel_hooks:
            hook()
        self.requester.cancel()
        if self.runner is not None:
            self.runner.abort()

    def _node_lost(self, reason: str) -> None:
        self.log.warning("%s", reason)
        self.lost_reason = reason
        if self.runner is not None:
            self.runner.abort()

    def run(self) -> dict:
        """Run the build (or fetch its stored result) and return the result JSON."""
        stored = self.zk.get_or_none(result_path(self.uuid))
        if stored is not None:
            self.log.info("Already has a result; returning it")
            return stored
        start = time.monotonic()
        try:
            self.zk.create(running_path(self.uuid), {"launcher": self.config.name}, ephemeral=True)
        except npexc.NodeExistsError:
            return self._await_other_launcher()
        try:
            attempt = self._run_attempts()
            result = {
                "result": attempt.result,
                "log_url": self.log_url,
                "elapsed": round(time.monotonic() - start, 3),
                "summary": attempt.summary,
            }
            self._publish()
            try:
                self.zk.create(result_path(self.uuid), result)
            except npexc.NodeExistsError:
                # Our ZK session was lost mid-build and another launcher finished it.
                self.log.warning("A result was stored meanwhile; returning that one")
                return self.zk.get(result_path(self.uuid))[0]
            self.log.info("%s in %.1f s", result["result"], result["elapsed"])
            return result
        finally:
            self.zk.delete(running_path(self.uuid))
            self.jobdir.cleanup()

    def _await_other_launcher(self) -> dict:
        """Another launcher runs this uuid (a re-submission): wait for its result.

        If that launcher dies first (its ephemeral `running` vanishes without a
        result), run the build here.
        """
        self.log.info("Running elsewhere; waiting for its result")
        wake = threading.Event()
        self._cancel_hooks.append(wake.set)

        def on_change(data: dict | None, version: int | None, want_gone: bool) -> bool:
            if (data is None) == want_gone:
                wake.set()
            return not wake.is_set()

        self.zk.watch_data(result_path(self.uuid), lambda d, v: on_change(d, v, False))
        self.zk.watch_data(running_path(self.uuid), lambda d, v: on_change(d, v, True))
        wake.wait()
        stored = self.zk.get_or_none(result_path(self.uuid))
        if stored is not None:
            return stored
        if self.cancelled.is_set():
            return {
                "result": "ABORTED",
                "log_url": self.log_url,
                "elapsed": 0.0,
                "summary": "The build was cancelled.",
            }
        return self.run()

    def _run_attempts(self) -> Attempt:
        self.jobdir.logs.mkdir(parents=True, exist_ok=True)
        try:
            resolve_playbooks(self.args, self.config.jobs_dir)
        except PlaybookError as error:
            self.output.write(str(error))
            return Attempt("FAILURE", str(error))
        attempt = Attempt("NODE_FAILURE")
        for number in range(1, self.config.attempts + 1):
            if number > 1:
                self.output.write(
                    f"Retrying on a new node (attempt {number} of "
                    f"{self.config.attempts}): {attempt.summary}"
                )
            attempt = self._attempt()
            self._log_attempt(number, attempt)
            if not attempt.retry or self.cancelled.is_set():
                break
        else:
            if self.config.attempts > 1:
                return Attempt(
                    "RETRY_LIMIT",
                    f"Gave up after {self.config.attempts} "
                    f"attempts; the last one said:\n{attempt.summary}",
                )
        if self.cancelled.is_set():
            return Attempt("ABORTED", "The build was cancelled.")
        return attempt

    def _log_attempt(self, number: int, attempt: Attempt) -> None:
        self.log.info(
            "Attempt %s: %s%s", number, attempt.result, " (will retry)" if attempt.retry else ""
        )
        for line in (attempt.summary or "").splitlines():
            self.output.write(line)

    def _attempt(self) -> Attempt:
        self.lost_reason = None
        self.status("node", 1, len(STEPS))
        try:
            node = self.requester.request(self.args["node_type"], self.config.node_timeout)
        except NodeRequestCancelled:
            return Attempt("ABORTED")
        except NodeError as error:
            self.output.write(str(error))
            return Attempt("NODE_FAILURE", str(error))
        stop_watch = self.requester.watch_lost(node, self._node_lost)
        try:
            address = NodeAddress(
                node.interface_ip or "127.0.0.1",
                node.connection_port,
                node.username,
                list(node.host_keys),
            )
            self.output.write(f"Node {node.id} ({node.type}) at {address.host}:{address.port}")
            return self._run_playbooks(address)
        finally:
            stop_watch()
            self.requester.release(node)

    def _run_playbooks(self, address: NodeAddress) -> Attempt:
        cfg = self.config
        phases = write_ansible_dir(
            self.jobdir,
            self.args,
            address,
            jobs_dir=cfg.jobs_dir,
            private_key=cfg.private_key,
            connect_timeout=cfg.connect_timeout,
        )
        self.runner = AnsibleRunner(self.jobdir, self.output, cfg.ansible_playbook)
        try:
            attempt = self._main_phases(phases)
            if attempt.collect:
                self._collect(phases["collect"][0])
            return attempt
        finally:
            self.runner.close_connections()
            self.records.extend(logs.read_results(self.jobdir))
            self.jobdir.results.unlink(missing_ok=True)

    def _play(self, playbook: Path, phase: str, timeout: float | None) -> Outcome:
        assert self.runner is not None
        self.status(phase, STEPS.index(phase) + 1, len(STEPS))
        outcome = self.runner.run(playbook, phase, timeout)
        if outcome == Outcome.ABORTED and self.lost_reason and not self.cancelled.is_set():
            return Outcome.UNREACHABLE
        return outcome

    def _summary(self, fallback: str) -> str:
        return logs.extract_summary(logs.read_results(self.jobdir)) or fallback

    def _main_phases(self, phases: dict[str, list[Path]]) -> Attempt:
        """setup, pre and run; then post, which runs whenever setup worked."""
        outcome = self._play(phases["setup"][0], "setup", self.config.setup_timeout)
        if outcome == Outcome.ABORTED:
            return Attempt("ABORTED", collect=False)
        if outcome != Outcome.OK:
            reason = self.lost_reason or self._summary("The node could not be prepared.")
            return Attempt("NODE_FAILURE", reason, retry=True, collect=False)
        timeout = float(self.args.get("timeout") or 0) or None
        deadline = time.monotonic() + timeout if timeout else None
        attempt = Attempt("SUCCESS")
        for phase in ("pre", "run"):
            for playbook in phases[phase]:
                left = None if deadline is None else deadline - time.monotonic()
                outcome = self._play(playbook, phase, left)
                attempt = self._map(phase, outcome, timeout)
                if attempt.result != "SUCCESS":
                    break
            if attempt.result != "SUCCESS":
                break
        for playbook in phases["post"]:
            if attempt.result in ("ABORTED", "NODE_FAILURE"):
                break
            outcome = self._play(playbook, "post", self.config.post_timeout)
            if outcome != Outcome.OK and attempt.result == "SUCCESS":
                attempt = Attempt("POST_FAILURE", self._summary("A post playbook failed."))
        return attempt

    def _map(self, phase: str, outcome: Outcome, timeout: float | None) -> Attempt:
        """A pre/run playbook outcome as a build result (Zuul's mapping)."""
        if outcome == Outcome.OK:
            return Attempt("SUCCESS")
        if outcome == Outcome.ABORTED:
            return Attempt("ABORTED")
        if outcome == Outcome.TIMED_OUT:
            return Attempt("TIMED_OUT", f"The job exceeded its timeout of {timeout:.0f} seconds.")
        if outcome == Outcome.UNREACHABLE:
            reason = self.lost_reason or self._summary("The node became unreachable.")
            return Attempt("NODE_FAILURE", reason, retry=True, collect=False)
        if phase == "pre":
            return Attempt("FAILURE", self._summary("A pre playbook failed."), retry=True)
        return Attempt("FAILURE", self._summary("The run playbook failed."))

    def _collect(self, playbook: Path) -> None:
        """Fetch the node's artifacts and console logs; failure only costs logs."""
        if self.lost_reason or self.cancelled.is_set():
            return
        if self._play(playbook, "collect", self.config.post_timeout) != Outcome.OK:
            self.output.write("Collecting the node's logs failed; see above.")
        logs.unpack_node_logs(self.jobdir)

    def _publish(self) -> None:
        logs.write_job_output_json(self.jobdir, self.records)
        try:
            logs.publish(self.jobdir, self.log_dir)
        except OSError:
            self.log.exception("Could not publish the logs")
