"""Ansible callback that announces the first task failure that will fail the play.

The launcher sets $ZUUL_EARLY_FAILURE_TOKEN only for playbooks whose failure
ends the build as FAILURE (run, and pre on the last attempt). For each failed
task that ansible neither ignores (`ignore_errors`) nor rescues (a `rescue:`
section of an enclosing block catches it), this prints one line
`<token> {"task": ..., "playbook": ...}` on ansible's stdout; the launcher
takes that line out of job-output.txt and tells the scheduler. `failed_when:
false` never reaches here (the task is ok), and an unreachable node is a
NODE_FAILURE the launcher retries, so it is not announced either. The token
is random per build, so output from the node cannot forge the line.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
    name: zuul_early_failure
    type: notification
    short_description: announces failed tasks that no rescue or ignore_errors catches
    description: Prints `$ZUUL_EARLY_FAILURE_TOKEN {json}` for each such failed task.
"""

TOKEN_ENV = "ZUUL_EARLY_FAILURE_TOKEN"


def rescued(task: Any) -> bool:
    """Whether a block around `task` has a rescue section for it.

    A task (or the include, or inner block, holding it) in a block's `block:`
    list is caught by that block's `rescue:`; one in `rescue:` or `always:` is
    not, so the walk goes on to the blocks further out. Tasks are compared by
    `_uuid` because the iterator hands out copies.
    """
    child, parent = task, task._parent
    while parent is not None:
        if getattr(parent, "rescue", None) and any(
            t._uuid == child._uuid for t in getattr(parent, "block", None) or []
        ):
            return True
        child, parent = parent, parent._parent
    return False


class CallbackModule(CallbackBase):
    """Prints the token line for each failure that will fail the play."""

    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "notification"
    CALLBACK_NAME = "zuul_early_failure"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self) -> None:
        super().__init__()
        self.token = os.environ.get(TOKEN_ENV, "")
        self.playbook = ""

    def v2_playbook_on_start(self, playbook: Any) -> None:
        self.playbook = os.path.basename(playbook._file_name)

    def v2_runner_on_failed(self, result: Any, ignore_errors: bool = False) -> None:
        if not self.token or ignore_errors or rescued(result._task):
            return
        event = {"task": result._task.get_name(), "playbook": self.playbook}
        self._display.display(f"{self.token} {json.dumps(event)}")
