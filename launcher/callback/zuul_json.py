"""Ansible callback that records per-task results for job-output.json.

The human log keeps ansible's `default` stdout callback; this one runs beside
it (a notification callback) and appends one JSON line per playbook to the
file named by $ZUUL_JSON_RESULTS. The launcher reads those lines to tell a
failed task from an unreachable node and to quote a failed task's error lines.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
    name: zuul_json
    type: notification
    short_description: per-task results as JSON lines for the zuul-lite launcher
    description: Appends one JSON object per playbook to $ZUUL_JSON_RESULTS.
"""

MAX_OUTPUT = 1_000_000  # characters kept per stdout/stderr; make can print a lot


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat()


def _trim(result: dict[str, Any]) -> dict[str, Any]:
    for key in ("stdout", "stderr"):
        value = result.get(key)
        if isinstance(value, str) and len(value) > MAX_OUTPUT:
            result[key] = value[-MAX_OUTPUT:]
            result.pop(key + "_lines", None)
    for item in result.get("results") or []:
        if isinstance(item, dict):
            _trim(item)
    return result


class CallbackModule(CallbackBase):
    """Collects plays, tasks and host results; writes them when the playbook ends."""

    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "notification"
    CALLBACK_NAME = "zuul_json"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self) -> None:
        super().__init__()
        self.playbook: str | None = None
        self.plays: list[dict[str, Any]] = []
        self.started = _now()

    def v2_playbook_on_start(self, playbook: Any) -> None:
        self.playbook = os.path.basename(playbook._file_name)

    def v2_playbook_on_play_start(self, play: Any) -> None:
        self.plays.append({"name": play.get_name(), "tasks": []})

    def v2_playbook_on_task_start(self, task: Any, is_conditional: bool) -> None:
        if not self.plays:
            self.plays.append({"name": "", "tasks": []})
        self.plays[-1]["tasks"].append(
            {"name": task.get_name(), "action": task.action, "start": _now(), "hosts": {}}
        )

    v2_playbook_on_handler_task_start = v2_playbook_on_task_start

    def _record(self, result: Any, status: str) -> None:
        if not self.plays or not self.plays[-1]["tasks"]:
            return
        task = self.plays[-1]["tasks"][-1]
        data = _trim(dict(result.result))
        data["status"] = status
        task["hosts"][result.host.get_name()] = data
        task["end"] = _now()

    def v2_runner_on_ok(self, result: Any) -> None:
        self._record(result, "changed" if result.result.get("changed") else "ok")

    def v2_runner_on_failed(self, result: Any, ignore_errors: bool = False) -> None:
        self._record(result, "ignored" if ignore_errors else "failed")

    def v2_runner_on_unreachable(self, result: Any) -> None:
        self._record(result, "unreachable")

    def v2_runner_on_skipped(self, result: Any) -> None:
        self._record(result, "skipped")

    def v2_playbook_on_stats(self, stats: Any) -> None:
        summary = {host: stats.summarize(host) for host in sorted(stats.processed)}
        path = os.environ.get("ZUUL_JSON_RESULTS")
        if not path:
            return
        record = {
            "playbook": self.playbook,
            "phase": os.environ.get("ZUUL_PHASE", ""),
            "start": self.started,
            "end": _now(),
            "plays": self.plays,
            "stats": summary,
        }
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps(record, default=str) + "\n")
