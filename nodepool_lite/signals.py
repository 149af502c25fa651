"""What a daemon's main thread waits on: SIGTERM/SIGINT to stop, SIGHUP to reload.

The kernel hands a signal sent to the process to any of its threads. Python
runs the handler on the main thread, but a main thread blocked on a lock
(`Event.wait()`) wakes only if the kernel picked it: otherwise the daemon
ignores SIGTERM for good (a zuul-launcher under load did, with its builds
running). So the main thread reads a pipe instead, into which the C-level
handler writes the signal's number whichever thread took it
(`signal.set_wakeup_fd`).

`kill -USR2` prints every thread's stack to stderr (faulthandler), as Zuul's
daemons do, to see where a stuck daemon is.
"""

from __future__ import annotations

import faulthandler
import os
import signal
from collections import deque


class Signals:
    """Install in the main thread, before starting the daemon's threads."""

    def __init__(self, reload: bool = False) -> None:
        self.handled = {signal.SIGTERM, signal.SIGINT} | ({signal.SIGHUP} if reload else set())
        self._pending: deque[int] = deque()
        self._read, write = os.pipe()
        os.set_blocking(write, False)
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        for sig in self.handled:
            # The number reaches the pipe only while Python handles the signal.
            signal.signal(sig, lambda signum, frame: None)
        faulthandler.register(signal.SIGUSR2, all_threads=True)

    def wait(self) -> int:
        """The next signal of `handled` received (blocks until one is)."""
        while not self._pending:
            self._pending.extend(n for n in os.read(self._read, 64) if n in self.handled)
        return self._pending.popleft()
