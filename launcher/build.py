"""One build: node, playbooks, logs, result; the launcher's AnsibleJob.

The flow (doc/architecture.md): a stored result is returned as is (the
scheduler re-submits after a restart); otherwise claim the build in
ZooKeeper (ZuulState.claim_build), fetch the change from the merger into the
launcher's cache (gitcache.py), get a node, run setup (which pushes the change
to the node) → pre → run → post → collect-logs, give the node back, publish
logs, store the BuildResult and only then return it for WORK_COMPLETE. Node
trouble and pre-run failures are retried on a fresh node, as Zuul does, up to
`attempts`.

Two ways to stop a build, kept apart: cancel() is the scheduler's
`launcher:stop:<name>` and ends the build ABORTED like any result; abandon()
is this launcher shutting down: ansible is killed and the node released as
well, but no result is stored and run() raises BuildAbandoned, so the
scheduler sees a build without a result and runs it again on a new node
instead of voting on an ABORTED that no change caused.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from launcher import logs
from launcher.ansible import AnsibleRunner, Outcome, OutputLog
from launcher.buildlog import build_log
from launcher.config import LauncherConfig
from launcher.earlyfailure import EarlyFailure
from launcher.gitcache import FetchedChange, GitCache, GitCacheError
from launcher.jobdir import JobDir
from launcher.nodes import NodeError, NodeRequestCancelled, NodeRequester
from launcher.playbooks import NodeAddress, PlaybookError, resolve_playbooks, write_ansible_dir
from nodepool_lite import exceptions as npexc
from nodepool_lite.model import Node
from zuul_lite import autohold
from zuul_lite.build_contract import BuildRequest, BuildResult
from zuul_lite.state import ZuulState

STEPS = ("fetch", "node", "setup", "pre", "run", "post", "collect")
# Seconds before fetching the change again: a scheduler restarting its git
# server is back within these; after the last one the build ends NODE_FAILURE.
FETCH_RETRY_DELAYS = (2.0, 10.0)
# Results an early failure overrides: the scheduler was already told "fails".
OVERRIDDEN_BY_EARLY_FAILURE = ("SUCCESS", "POST_FAILURE", "NODE_FAILURE")

StatusCallback = Callable[[str, int, int], None]


class BuildAbandoned(Exception):
    """The launcher stopped under the build: no result, the scheduler runs it again."""


@dataclass(slots=True)
class Attempt:
    """How one attempt ended: a build result, or `retry` to try on a fresh node."""

    result: str
    summary: str = ""
    retry: bool = False
    collect: bool = True  # whether the node is usable enough to fetch its logs


class Build:
    """Runs one `launcher:execute` job; cancel() and abandon() may come from any thread."""

    def __init__(
        self,
        config: LauncherConfig,
        state: ZuulState,
        request: BuildRequest,
        status: StatusCallback,
        console: str | None = None,
    ) -> None:
        self.config = config
        self.console = console  # where this launcher streams job-output.txt live
        self.state = state
        self.request = request
        self.uuid = request.uuid
        self.status = status
        self.log = build_log("launcher.build", request)
        self.jobdir = JobDir(config.work_root, self.uuid)
        self.cache = GitCache(config.git_cache, config.setup_timeout)
        self.change: FetchedChange | None = None
        self.dependencies: dict[str, Path] = {}
        self.requester = NodeRequester(
            state.zk, f"{config.name}:{self.uuid}", build_log("launcher.nodes", request)
        )
        self.runner: AnsibleRunner | None = None
        self.log_dir = logs.log_dir(config.log_root, request.log_path)
        self.output = OutputLog(self.log_dir / "job-output.txt")
        self.early = EarlyFailure(request.failure_output, self._report_early_failure, self.log)
        self.cancelled = threading.Event()  # set by cancel() and by abandon()
        self.abandoned = threading.Event()  # only abandon(): store no result
        self.lost_reason: str | None = None
        self.records: list[dict] = []
        self._cancel_hooks: list[Callable[[], None]] = []
        self._claim_lock = threading.Lock()
        self._claimed = False
        self._session_lost = False

    @property
    def log_url(self) -> str:
        return f"{self.config.log_url.rstrip('/')}/{self.request.log_path.strip('/')}/"

    def cancel(self) -> None:
        """The scheduler stops the build: kill ansible, free the node, end ABORTED."""
        self.log.info("Cancelling")
        self._halt()

    def abandon(self) -> None:
        """The launcher stops: kill ansible, free the node, but store no result."""
        self.log.info("Abandoning: the launcher is stopping")
        self.abandoned.set()
        self._halt()

    def _halt(self) -> None:
        self.cancelled.set()
        for hook in self._cancel_hooks:
            hook()
        self.requester.cancel()
        if self.runner is not None:
            self.runner.abort()

    def on_connection(self, state: str) -> None:
        """A ZooKeeper state change, from kazoo's thread (so nothing here blocks).

        A new session after a lost one has dropped our ephemeral node request
        (the requester asks again) and our `running` claim (claimed again here).
        """
        self.requester.on_connection(state)
        if state == "LOST":
            self._session_lost = True
        elif state == "CONNECTED" and self._session_lost:
            self._session_lost = False
            threading.Thread(target=self._reclaim, name="launcher-reclaim", daemon=True).start()

    def _claim(self) -> bool:
        with self._claim_lock:
            self._claimed = self.state.claim_build(self.uuid, self.config.name, self.console)
            return self._claimed

    def _release(self) -> None:
        with self._claim_lock:
            self._claimed = False
            self.state.release_build(self.uuid)

    def _reclaim(self) -> None:
        """Claim the build again after a session loss, unless it ended meanwhile."""
        with self._claim_lock:
            if not self._claimed:
                return
            try:
                if self.state.get_build_result(self.uuid) is not None:
                    return
                if self.state.claim_build(self.uuid, self.config.name, self.console):
                    self.log.info("Claimed the build again after a ZooKeeper session loss")
                else:
                    self.log.warning(
                        "Another launcher claimed the build while our session was lost"
                    )
            except npexc.NodepoolError as error:
                self.log.warning("Could not claim the build again: %s", error)

    def run(self) -> BuildResult:
        """Run the build (or fetch its stored result) and return the result.

        Raises BuildAbandoned when abandon() stopped it: nothing is stored then.
        """
        stored = self.state.get_build_result(self.uuid)
        if stored is not None:
            self.log.info("Already has a result; returning it")
            return stored
        start = time.monotonic()
        if not self._claim():
            return self._await_other_launcher()
        try:
            attempt = self._run_attempts()
            if self.abandoned.is_set():
                self.output.write("The launcher stopped; the build will run again on a new node.")
                self.log.info("Abandoned without a result")
                raise BuildAbandoned()
            result = BuildResult(
                attempt.result,
                self.log_url,
                round(time.monotonic() - start, 3),
                attempt.summary,
                logs.read_findings(self.jobdir, self.log)
                if attempt.result in ("SUCCESS", "FAILURE")
                else None,
            )
            self._publish()
            counted = self.state.store_build_result(self.uuid, result)
            if counted is not result:
                # Our ZK session was lost mid-build and another launcher finished it.
                self.log.warning("A result was stored meanwhile; returning that one")
            else:
                self.log.info("%s in %.1f s", result.result, result.elapsed)
            return counted
        finally:
            self._release()
            self.jobdir.cleanup()

    def _await_other_launcher(self) -> BuildResult:
        """Another launcher runs this uuid (a re-submission): wait for its result.

        If that launcher dies first (its ephemeral claim vanishes without a
        result), run the build here.
        """
        self.log.info("Running elsewhere; waiting for its result")
        wake = threading.Event()
        self._cancel_hooks.append(wake.set)

        def on_children(children: list[str]) -> bool:
            if "result" in children or "running" not in children:
                wake.set()
            return not wake.is_set()

        self.state.watch_build(self.uuid, on_children)
        wake.wait()
        stored = self.state.get_build_result(self.uuid)
        if stored is not None:
            return stored
        if self.abandoned.is_set():
            raise BuildAbandoned()
        if self.cancelled.is_set():
            return BuildResult("ABORTED", self.log_url, 0.0, "The build was cancelled.")
        return self.run()

    def _run_attempts(self) -> Attempt:
        self.jobdir.logs.mkdir(parents=True, exist_ok=True)
        try:
            resolve_playbooks(self.request, self.config.jobs_dir)
            self.dependencies = logs.dependency_dirs(self.config.log_root, self.request.artifacts)
        except (PlaybookError, logs.DependencyError) as error:
            self.output.write(str(error))
            return Attempt("FAILURE", str(error))
        try:
            self.change = self._fetch_change()
        except GitCacheError as error:
            if self.cancelled.is_set():
                return Attempt("ABORTED", "The build was cancelled.")
            self.output.write(str(error))
            return Attempt("NODE_FAILURE", str(error))
        attempts = self.config.attempts
        attempt = Attempt("NODE_FAILURE")
        for number in range(1, attempts + 1):
            if number > 1:
                self.output.write(
                    f"Retrying on a new node (attempt {number} of {attempts}): {attempt.summary}"
                )
            attempt = self._attempt(last=number == attempts)
            self._log_attempt(number, attempt)
            # After an early failure the scheduler counts the build as failed:
            # another attempt could not change that.
            if not attempt.retry or self.cancelled.is_set() or self.early.reason:
                break
        if self.cancelled.is_set():
            return Attempt("ABORTED", "The build was cancelled.")
        if self.early.reason and attempt.result in OVERRIDDEN_BY_EARLY_FAILURE:
            return Attempt("FAILURE", self.early.reason)
        if attempt.retry and attempts > 1:
            return Attempt(
                "RETRY_LIMIT",
                f"Gave up after {attempts} attempts; the last one said:\n{attempt.summary}",
            )
        return attempt

    def _fetch_change(self) -> FetchedChange:
        """Fetch the change into the cache, trying again after FETCH_RETRY_DELAYS.

        A fetch in progress is not interrupted by a cancel, which takes effect
        when it ends (it is a few commits but the first time per project).
        """
        self.status("fetch", 1, len(STEPS))
        fetch_log = build_log("launcher.gitcache", self.request)
        for delay in FETCH_RETRY_DELAYS:
            try:
                return self.cache.fetch(self.request, fetch_log)
            except GitCacheError as error:
                self.log.warning("%s Fetching again in %.0f s", error, delay)
            if self.cancelled.wait(delay):
                break
        return self.cache.fetch(self.request, fetch_log)

    def _log_attempt(self, number: int, attempt: Attempt) -> None:
        self.log.info(
            "Attempt %s: %s%s", number, attempt.result, " (will retry)" if attempt.retry else ""
        )
        for line in (attempt.summary or "").splitlines():
            self.output.write(line)

    def _report_early_failure(self, reason: str) -> None:
        """Tell the scheduler now; the result stored at the end still says it all."""
        self.log.info("Early failure: %s", reason)
        self.output.write(f"Early failure, reported to the scheduler: {reason}")
        try:
            self.state.mark_early_failure(self.uuid, reason)
        except npexc.NodepoolError as error:
            self.log.warning("Could not store the early failure: %s", error)

    def _attempt(self, last: bool) -> Attempt:
        self.lost_reason = None
        self.status("node", STEPS.index("node") + 1, len(STEPS))
        try:
            node = self.requester.request(self.request.node_type, self.config.node_timeout)
        except NodeRequestCancelled:
            return Attempt("ABORTED")
        except NodeError as error:
            self.output.write(str(error))
            return Attempt("NODE_FAILURE", str(error))
        stop_watch = self.requester.watch_lost(node, self._node_lost)
        attempt: Attempt | None = None
        try:
            address = NodeAddress.of(node)
            self.output.write(f"Node {node.id} ({node.type}) at {address.host}:{address.port}")
            attempt = self._run_playbooks(address, last)
            return attempt
        finally:
            stop_watch()
            self._give_back(node, attempt)

    def _give_back(self, node: Node, attempt: Attempt | None) -> None:
        """To nodepool to destroy, or held if an autohold request wants it."""
        held = None
        if attempt is not None and attempt.result in autohold.HOLD_RESULTS:
            req = self.request
            try:
                held = autohold.claim(self.state, req.project, req.job, req.change, node.id or "")
            except npexc.NodepoolError as error:
                self.log.warning("Could not look at the autohold requests: %s", error)
        if held is None:
            self.requester.release(node)
            return
        self.output.write(f"Node {node.id} is held for autohold request {held.id}: {held.reason}")
        self.requester.hold(node, f"{self.request.project}/{self.request.job}", held.reason)

    def _node_lost(self, reason: str) -> None:
        self.log.warning("%s", reason)
        self.lost_reason = reason
        if self.runner is not None:
            self.runner.abort()

    def _run_playbooks(self, address: NodeAddress, last: bool) -> Attempt:
        cfg = self.config
        phases = write_ansible_dir(
            self.jobdir,
            self.request,
            address,
            jobs_dir=cfg.jobs_dir,
            private_key=cfg.private_key,
            connect_timeout=cfg.connect_timeout,
            change=self.change,
            dependencies=self.dependencies,
        )
        self.runner = AnsibleRunner(self.jobdir, self.output, cfg.ansible_playbook, self.log)
        if self.cancelled.is_set():  # a stop that came before the runner existed
            self.runner.abort()
        try:
            attempt = self._main_phases(phases, last)
            if attempt.collect:
                self._collect(phases["collect"][0])
            return attempt
        finally:
            self.runner.close_connections()
            self.records.extend(logs.read_results(self.jobdir))
            self.jobdir.results.unlink(missing_ok=True)

    def _play(
        self, playbook: Path, phase: str, timeout: float | None, watch: bool = False
    ) -> Outcome:
        assert self.runner is not None
        self.status(phase, STEPS.index(phase) + 1, len(STEPS))
        outcome = self.runner.run(playbook, phase, timeout, self.early if watch else None)
        if outcome == Outcome.ABORTED and self.lost_reason and not self.cancelled.is_set():
            return Outcome.UNREACHABLE
        return outcome

    def _summary(self, fallback: str) -> str:
        return logs.extract_summary(logs.read_results(self.jobdir)) or fallback

    def _main_phases(self, phases: dict[str, list[Path]], last: bool) -> Attempt:
        """setup, pre and run; then post, which runs whenever setup worked.

        Early failure is watched for where a failure ends the build as
        FAILURE: run playbooks, and pre playbooks on the last attempt (before
        that, a pre failure is retried on a new node).
        """
        outcome = self._play(phases["setup"][0], "setup", self.config.setup_timeout)
        if outcome == Outcome.ABORTED:
            return Attempt("ABORTED", collect=False)
        if outcome != Outcome.OK:
            reason = self.lost_reason or self._summary("The node could not be prepared.")
            return Attempt("NODE_FAILURE", reason, retry=True, collect=False)
        timeout = float(self.request.timeout or 0) or None
        deadline = time.monotonic() + timeout if timeout else None
        attempt = Attempt("SUCCESS")
        for phase in ("pre", "run"):
            for playbook in phases[phase]:
                left = None if deadline is None else deadline - time.monotonic()
                outcome = self._play(playbook, phase, left, watch=phase == "run" or last)
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
        truncated = logs.unpack_node_logs(self.jobdir)
        if truncated:
            self.output.write(truncated)

    def _publish(self) -> None:
        logs.write_job_output_json(self.jobdir, self.records)
        try:
            logs.publish(self.jobdir, self.log_dir)
        except OSError:
            self.log.exception("Could not publish the logs")
