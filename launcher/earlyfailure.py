"""Early failure: tell the scheduler as soon as a build is bound to fail.

While the pre/run playbooks run (only those whose failure ends the build as
FAILURE: see Build), ansible's output passes through `feed()`. The first
failed task that is neither ignored nor rescued (announced by
callback/zuul_early_failure.py as a token line, which is kept out of
job-output.txt) or the first line matching one of the job's `failure-output`
regexes calls `report(reason)`, once per build. The scheduler can then act
(report, reset a gate queue) before post playbooks and log upload end.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
from collections.abc import Callable

from launcher.buildlog import Log

# Read by callback/zuul_early_failure.py inside ansible-playbook (not imported
# here: that would load ansible into the launcher).
TOKEN_ENV = "ZUUL_EARLY_FAILURE_TOKEN"

# zuul_output echoes a command's lines as `<host> | <line>`: regexes see the line.
ECHO_PREFIX = re.compile(r"^[\w.-]+ \| ")


class EarlyFailure:
    """Watches one build's output and reports the first sign of failure once."""

    def __init__(self, patterns: list[str], report: Callable[[str], None], log: Log) -> None:
        self.token = secrets.token_hex(16)
        self.regexes: list[re.Pattern[str]] = []
        for pattern in patterns:
            try:
                self.regexes.append(re.compile(pattern))
            except re.error as error:
                log.warning("Ignoring the failure-output regex %r: %s", pattern, error)
        self.reason: str | None = None
        self._report = report
        self._lock = threading.Lock()

    def env(self) -> dict[str, str]:
        """What ansible-playbook's environment needs for the callback to speak."""
        return {TOKEN_ENV: self.token}

    def feed(self, line: str) -> bool:
        """Look at one output line; return whether it belongs in job-output.txt."""
        if line.startswith(self.token):
            self._fire(_task_reason(line[len(self.token) :]))
            return False
        if self.reason is None and self.regexes:
            text = ECHO_PREFIX.sub("", line, count=1)
            for regex in self.regexes:
                if regex.search(text):
                    self._fire(f"Output matched failure-output {regex.pattern!r}: {text[:200]}")
                    break
        return True

    def _fire(self, reason: str) -> None:
        with self._lock:
            if self.reason is not None:
                return
            self.reason = reason
        self._report(reason)


def _task_reason(payload: str) -> str:
    try:
        event = json.loads(payload)
        return f"Task '{event['task']}' failed in {event['playbook']}."
    except (ValueError, KeyError, TypeError):
        return "A task failed."
