"""The scheduler's calls to the outside that need no answer, off its thread.

Submitting a build to gearman waits for the server's JOB_CREATED, and a
build's ZooKeeper watch reads its children once when it is set: a round trip
each. The scheduler thread stores what it decided first (a build is `queued`
in ZooKeeper before it is submitted) and posts these calls here, where one
thread makes them in the order posted, so a cancel always follows the submit
it cancels. A call that raises is logged and the next one runs.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger("zuul_lite.dispatcher")


class Dispatcher(threading.Thread):
    def __init__(self, name: str = "dispatcher") -> None:
        super().__init__(name=name, daemon=True)
        self._calls: queue.Queue[Callable[[], None] | None] = queue.Queue()

    def post(self, call: Callable[[], None]) -> None:
        self._calls.put(call)

    def busy(self) -> bool:
        """Whether a posted call has not finished yet."""
        return self._calls.unfinished_tasks > 0

    def stop(self) -> None:
        """Stop once the calls posted before are made."""
        self._calls.put(None)

    def run(self) -> None:
        while True:
            call = self._calls.get()
            try:
                if call is None:
                    return
                call()
            except Exception:
                log.exception("A call made by the %s thread failed", self.name)
            finally:
                self._calls.task_done()
