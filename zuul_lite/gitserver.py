"""The merger's workspaces, served read-only over git to the launchers.

A launcher fetches the change under test from here (BuildRequest.git_url) and
pushes it on to its node itself, so neither launchers nor nodes need a path
on the scheduler's host. `git daemon` does the serving: upload-pack only,
receive-pack off and no repository allowed to turn it on, so nothing is
written through it; every repository under the merger's root is exported
(they are all the merger's). git-daemon runs as a child of the scheduler
under `setpriv --pdeathsig` (directly, not through the `git` wrapper, which
would be a second process in between), so it ends with the scheduler even
when that is killed (a daemon left behind would hold the port), and it is
started again whenever it exits while the scheduler runs.
"""

from __future__ import annotations

import logging
import re
import subprocess
import threading
import time
from pathlib import Path

from zuul_lite.exceptions import ZuulLiteError

log = logging.getLogger("zuul_lite.gitserver")

READY = "Ready to rumble"  # what `git daemon --verbose` says once it listens
START_TIMEOUT = 10.0
RESTART_DELAY = 1.0  # doubled after each quick exit, up to RESTART_DELAY_MAX
RESTART_DELAY_MAX = 30.0
STABLE_AFTER = 60.0  # seconds of serving after which an exit counts as a first one
_PID_PREFIX = re.compile(r"^(\[\d+\] )+")


class GitServerError(ZuulLiteError):
    """The git server did not come up: one sentence naming the address and why."""


class GitServer:
    """`start()` / `stop()`; serves every repository under `root` on listen:port."""

    def __init__(self, root: Path, listen: str, port: int) -> None:
        self.root = Path(root)
        self.listen = listen
        self.port = port
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._started = threading.Event()  # ready, or the first start failed
        self._error: str | None = None
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        host = f"[{self.listen}]" if ":" in self.listen else self.listen
        return f"{host}:{self.port}"

    def command(self) -> list[str]:
        exec_path = subprocess.run(
            ["git", "--exec-path"], capture_output=True, text=True, check=True
        ).stdout.strip()
        return [
            "setpriv",
            "--pdeathsig",
            "TERM",
            "--",
            f"{exec_path}/git-daemon",
            "--verbose",  # "Ready to rumble", and one line per request for the debug log
            f"--base-path={self.root}",
            "--export-all",
            "--reuseaddr",
            f"--listen={self.listen}",
            f"--port={self.port}",
            "--informative-errors",  # a launcher's error names the missing repository
            "--disable=receive-pack",
            "--forbid-override=receive-pack",
            "--init-timeout=30",  # a peer that connects and says nothing is dropped
            str(self.root),  # and nothing outside the merger's root is served
        ]

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Serve; raise GitServerError if the daemon does not listen within `timeout`."""
        self.root.mkdir(parents=True, exist_ok=True)
        # The daemon's parent-death signal follows the thread that spawned it:
        # every spawn happens on this one thread, which lives until stop().
        self._thread = threading.Thread(target=self._run, name="git-server", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            self.stop()
            raise GitServerError(
                f"The git server on {self.address} did not start within {timeout:.0f} seconds."
            )
        if self._error is not None:
            self.stop()
            raise GitServerError(
                f"The git server could not listen on {self.address}: {self._error}."
            )

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._stopping.set()
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        delay = RESTART_DELAY
        while True:
            began = time.monotonic()
            reason = self._serve()
            if self._stopping.is_set():
                return
            if not self._started.is_set():  # never listened: start() reports it
                self._error = reason
                self._started.set()
                return
            if time.monotonic() - began > STABLE_AFTER:
                delay = RESTART_DELAY
            log.warning(
                "The git server on %s exited (%s); starting it again in %.0f s",
                self.address,
                reason,
                delay,
            )
            if self._stopping.wait(delay):
                return
            delay = min(delay * 2, RESTART_DELAY_MAX)

    def _serve(self) -> str:
        """Run the daemon until it exits; return why it did, in a few words."""
        with self._lock:
            if self._stopping.is_set():
                return "stopped"
            try:
                proc = self._proc = subprocess.Popen(
                    self.command(),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                    errors="replace",
                )
            except (OSError, subprocess.CalledProcessError) as error:
                return f"cannot run git-daemon under setpriv: {error}"
        first_error = ""
        assert proc.stderr is not None
        for raw in proc.stderr:  # until the daemon and every child it forked are gone
            line = _PID_PREFIX.sub("", raw.strip())
            if line == READY:
                log.info("Serving %s read-only at git://%s/", self.root, self.address)
                self._started.set()
            elif line:
                log.debug("git daemon: %s", line)
                if not self._started.is_set() and not first_error:
                    first_error = line.removeprefix("fatal: ")
        code = proc.wait()
        return first_error or f"exit status {code}"
