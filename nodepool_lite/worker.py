"""The loop every nodepool thread runs, launcher and builder alike: wait for
a wake-up (set by ZooKeeper watches or another worker) or a long safety
tick, do one pass, repeat until stopped. A failed pass is logged and retried
on the next wake-up, so one bad record, a config error or a lost ZooKeeper
connection never ends the thread."""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod

from nodepool_lite import exceptions as exc

# Watches do the real work; the tick covers what no watch sees (a lock
# dropped by a dead requestor, watches lost with a session, cloud quota).
SAFETY_TICK = 30.0


class BaseWorker(threading.Thread, ABC):
    """`first_pass_at_once`: the builder's workers start with a pass (a due
    build, a missing upload); the launcher's wait for their start-up wake."""

    def __init__(
        self,
        name: str,
        stop_event: threading.Event,
        log: logging.Logger,
        interval: float = SAFETY_TICK,
        first_pass_at_once: bool = False,
    ):
        super().__init__(name=name, daemon=True)
        self.stop_event = stop_event
        self.wake_event = threading.Event()
        self.log = log
        self.interval = interval
        self.first_pass_at_once = first_pass_at_once

    def run(self) -> None:
        if self.first_pass_at_once:
            self.wake_event.set()
        while not self.stop_event.is_set():
            self.wake_event.wait(self.interval)
            self.wake_event.clear()
            if self.stop_event.is_set():
                break
            try:
                self.run_once()
            except exc.ConfigError as error:  # until a reload fixes it
                self.log.error("Pass skipped: %s", error)
            except exc.ZKError as error:
                self.log.warning("Pass failed, retrying on next change: %s", error)
            except Exception:
                self.log.exception("Pass failed")
        self.stopped()

    @abstractmethod
    def run_once(self) -> None:
        """One pass over ZooKeeper's state."""

    def wake(self) -> None:
        self.wake_event.set()

    def stop(self) -> None:
        """Ends the loop after the pass it is in (the event may be shared)."""
        self.stop_event.set()
        self.wake_event.set()

    def stopped(self) -> None:
        """After the last pass: wait for the threads this worker started."""
