"""A daemon's main thread sees SIGTERM whichever thread the kernel gave it to.

A zuul-launcher under load once ignored SIGTERM for good: the signal went to
one of its build threads and the main thread, blocked in Event.wait(), never
ran the handler. `pthread_kill` gives the signal to a chosen thread, as the
kernel did there.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import signal, threading, time
    from nodepool_lite.signals import Signals

    signals = Signals(reload=True)

    def worker():
        time.sleep(0.5)  # the main thread is in wait() by then
        signal.pthread_kill(threading.get_ident(), signal.SIGHUP)
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
        threading.Event().wait()  # a build thread that never ends

    threading.Thread(target=worker, daemon=True).start()
    print(signals.wait(), signals.wait(), flush=True)
    """
)


def test_a_signal_taken_by_another_thread_reaches_the_main_thread() -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.split() == [str(int(signal.SIGHUP)), str(int(signal.SIGTERM))]
