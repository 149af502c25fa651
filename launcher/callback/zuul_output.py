"""Ansible callback that prints what a successful task's command printed.

ansible's `default` stdout callback shows only `changed: [node]` for a task
that worked, and with -v it dumps every result field. Zuul's job-output.txt
shows the command's own output instead; this notification callback adds
exactly that: each stdout/stderr line of an ok task as `node | <line>`, right
after the default callback's status line. Failed tasks are left to the
default callback, which already prints their whole result.
"""

from __future__ import annotations

from typing import Any

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
    name: zuul_output
    type: notification
    short_description: command output of successful tasks, one line each
    description: Prints stdout and stderr lines of ok tasks as `host | line`.
"""


class CallbackModule(CallbackBase):
    """Echoes stdout/stderr of ok tasks (and loop items) into the play output."""

    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "notification"
    CALLBACK_NAME = "zuul_output"
    CALLBACK_NEEDS_ENABLED = True

    def _echo(self, result: Any) -> None:
        data = result.result
        if data.get("results") is not None:  # a loop: its items were echoed one by one
            return
        host = result.host.get_name()
        for key in ("stdout", "stderr"):
            text = data.get(key)
            if isinstance(text, str) and text:
                for line in text.splitlines():
                    self._display.display(f"{host} | {line}")

    def v2_runner_on_ok(self, result: Any) -> None:
        self._echo(result)

    def v2_runner_item_on_ok(self, result: Any) -> None:
        self._echo(result)
