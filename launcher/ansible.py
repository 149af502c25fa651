"""Run ansible-playbook for one build and stream its output into job-output.txt.

Each line of ansible's stdout is written with a timestamp prefix as it comes,
so a developer watching the log (or the console stream) sees progress live.
Timeouts and aborts kill the whole process group from a timer or from the
cancelling thread; nothing here sleeps or polls.
"""

from __future__ import annotations

import datetime
import enum
import logging
import os
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Protocol

from launcher.buildlog import Log
from launcher.jobdir import JobDir

log = logging.getLogger("launcher.ansible")

# ansible-playbook's exit code when a host was unreachable (TaskQueueManager)
RC_HOST_UNREACHABLE = 4


class Outcome(enum.StrEnum):
    """How one playbook run ended, before the launcher maps it to a build result."""

    OK = "ok"
    FAILED = "failed"
    UNREACHABLE = "unreachable"
    TIMED_OUT = "timed_out"
    ABORTED = "aborted"


def timestamp() -> str:
    """The job-output.txt prefix: UTC, microseconds, no zone (Zuul's format)."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


class OutputWatch(Protocol):
    """Sees each output line of a playbook (EarlyFailure is the one there is)."""

    def env(self) -> dict[str, str]: ...

    def feed(self, line: str) -> bool: ...


class OutputLog:
    """job-output.txt, appended line by line with a timestamp on each line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        # The live console (launcher/console.py) waits on this instead of
        # polling the file: `lines` counts what was written, `finished` ends it.
        self._grown = threading.Condition(self._lock)
        self.lines = 0
        self.finished = False

    def write(self, line: str) -> None:
        with self._lock, open(self.path, "a", encoding="utf-8") as out:
            out.write(f"{timestamp()} | {line.rstrip()}\n")
            out.flush()
            self._wrote()

    def _wrote(self) -> None:
        self.lines += 1
        self._grown.notify_all()

    def finish(self) -> None:
        """The build ended: followers read what is left and stop."""
        with self._grown:
            self.finished = True
            self._grown.notify_all()

    def wait(self, seen: int, timeout: float) -> None:
        """Until a line after the `seen`-th is written, the log finishes, or `timeout`."""
        with self._grown:
            self._grown.wait_for(lambda: self.lines != seen or self.finished, timeout)

    def copy_stream(self, stream: IO[bytes], keep: Callable[[str], bool] | None = None) -> None:
        """Copy a process's output until EOF; one open file, flushed per line.

        `keep(line)` sees every line first and may leave it out.
        """
        with open(self.path, "a", encoding="utf-8") as out:
            for raw in iter(stream.readline, b""):
                line = raw.decode("utf-8", errors="replace").rstrip("\n")
                if keep is not None and not keep(line):
                    continue
                with self._lock:
                    out.write(f"{timestamp()} | {line}\n")
                    out.flush()
                    self._wrote()


class AnsibleRunner:
    """Runs the playbooks of one build, one ansible-playbook process at a time."""

    def __init__(
        self, jobdir: JobDir, output: OutputLog, ansible_playbook: str, build_log: Log = log
    ) -> None:
        self.jobdir = jobdir
        self.output = output
        self.ansible_playbook = ansible_playbook
        self.log = build_log
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._aborted = False

    def _env(self, phase: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
        env.update(
            {
                "ANSIBLE_CONFIG": str(self.jobdir.config),
                "ANSIBLE_HOME": str(self.jobdir.tmp),
                "ANSIBLE_LOCAL_TEMP": str(self.jobdir.tmp),
                "ANSIBLE_NOCOLOR": "1",
                "ANSIBLE_FORCE_COLOR": "0",
                "PYTHONUNBUFFERED": "1",
                "ZUUL_JSON_RESULTS": str(self.jobdir.results),
                "ZUUL_PHASE": phase,
            }
        )
        return env

    def _kill(self, why: str) -> None:
        with self._lock:
            proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        self.log.info("Killing ansible-playbook (pid %s): %s", proc.pid, why)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def abort(self) -> None:
        """Stop the running playbook and refuse to start further ones."""
        with self._lock:
            self._aborted = True
        self._kill("build aborted")

    def close_connections(self) -> None:
        """Stop the ssh ControlMasters of this build.

        ansible's ssh clients run in their own sessions, so killing
        ansible-playbook's process group leaves them (and the node's command)
        alive until the master goes; closing the master ends them all now.
        """
        for sock in self.jobdir.control_dir.glob("*"):
            subprocess.run(
                ["ssh", "-O", "exit", "-o", f"ControlPath={sock}", "node"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=30,
            )

    def run(
        self,
        playbook: Path,
        phase: str,
        timeout: float | None,
        watch: OutputWatch | None = None,
    ) -> Outcome:
        """Run one playbook against the node; `timeout` seconds or None for no limit.

        `watch` sees every output line (and adds to the environment) while it runs.
        """
        cmd = [self.ansible_playbook, "-e", f"@{self.jobdir.vars}", str(playbook)]
        self.output.write(f"PLAYBOOK [{phase}] {playbook.name}")
        env = self._env(phase)
        if watch is not None:
            env.update(watch.env())
        timed_out = threading.Event()
        with self._lock:
            if self._aborted:
                return Outcome.ABORTED
            self._proc = subprocess.Popen(
                cmd,
                cwd=self.jobdir.ansible,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            proc = self._proc
        timer = None
        if timeout is not None:

            def expire() -> None:
                timed_out.set()
                self._kill(f"timeout of {timeout:.0f} s")

            timer = threading.Timer(max(timeout, 0.0), expire)
            timer.daemon = True
            timer.start()
        try:
            self.output.copy_stream(proc.stdout, watch.feed if watch is not None else None)
            rc = proc.wait()
        finally:
            if timer is not None:
                timer.cancel()
            proc.stdout.close()
            with self._lock:
                self._proc = None
        self.log.debug("%s finished with rc %s", playbook.name, rc)
        if self._aborted:
            return Outcome.ABORTED
        if timed_out.is_set():
            self.output.write(f"Playbook {playbook.name} exceeded its timeout")
            return Outcome.TIMED_OUT
        if rc == 0:
            return Outcome.OK
        if rc == RC_HOST_UNREACHABLE:
            return Outcome.UNREACHABLE
        return Outcome.FAILED
