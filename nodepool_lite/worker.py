"""The loop every nodepool launcher thread runs: wait for a wake-up (set by
ZooKeeper watches) or a long safety tick, do one pass, repeat until stopped.
A failed pass is logged and retried on the next wake-up, so one bad record
or a lost ZooKeeper connection never ends the thread."""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod

from nodepool_lite import exceptions as exc

# Watches do the real work; the tick covers what no watch sees (a lock
# dropped by a dead requestor, watches lost with a session, cloud quota).
SAFETY_TICK = 30.0


class BaseWorker(threading.Thread, ABC):
    def __init__(self, name: str, stop_event: threading.Event, log: logging.Logger):
        super().__init__(name=name, daemon=True)
        self.stop_event = stop_event
        self.wake_event = threading.Event()
        self.log = log

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.wake_event.wait(SAFETY_TICK)
            self.wake_event.clear()
            if self.stop_event.is_set():
                break
            try:
                self.run_once()
            except exc.ZKError as error:
                self.log.warning("Pass failed, retrying on next change: %s", error)
            except Exception:
                self.log.exception("Pass failed")
        self.stopped()

    @abstractmethod
    def run_once(self) -> None:
        """One pass over ZooKeeper's state."""

    def stopped(self) -> None:
        """After the last pass: wait for the threads this worker started."""
