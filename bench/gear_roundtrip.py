"""Gearman submit→complete round trip, with and without TCP_NODELAY.

gear 0.16 leaves Nagle on: each small WORK_COMPLETE waits for the peer's
delayed ACK. Prints ms per round trip for plain gear and for our NODELAY
subclasses (launcher.gearworker, zuul_lite.gearman.GearServer), and the ratio.

    .venv/bin/python bench/gear_roundtrip.py [-n 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import gear

from launcher.gearworker import NoDelayClient, NoDelayWorker, set_nodelay


class NoDelayServer(gear.Server):
    """gear.Server with TCP_NODELAY on accepted sockets (as zuul_lite.gearman.GearServer)."""

    def _registerConnection(self, conn):  # noqa: N802 (gear's name)
        set_nodelay(conn)
        super()._registerConnection(conn)


class WaitingClient:
    """Mixin: one Event per job so the benchmark waits without polling."""

    def handleWorkComplete(self, packet):  # noqa: N802
        job = super().handleWorkComplete(packet)
        job.done.set()
        return job


class PlainClient(WaitingClient, gear.Client):
    pass


class FastClient(WaitingClient, NoDelayClient):
    pass


def measure(server_cls, client_cls, worker_cls, rounds: int) -> list[float]:
    server = server_cls(0, host="127.0.0.1", statsd_host=None)
    worker = worker_cls(client_id="bench-worker")
    worker.addServer("127.0.0.1", server.port)
    worker.registerFunction("bench")
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                job = worker.getJob()
            except gear.InterruptedError:
                continue
            job.sendWorkComplete(b'{"result": "SUCCESS"}')

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = client_cls(client_id="bench-client")
    client.addServer("127.0.0.1", server.port)
    client.waitForServer()
    worker.waitForServer()
    times = []
    for n in range(rounds + 5):
        job = gear.TextJob("bench", json.dumps({"uuid": str(n)}))
        job.done = threading.Event()
        start = time.perf_counter()
        client.submitJob(job)
        job.done.wait(10)
        if n >= 5:  # warm-up
            times.append((time.perf_counter() - start) * 1000)
    stop.set()
    worker.stopWaitingForJobs()
    client.shutdown()
    worker.shutdown()
    server.shutdown()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--rounds", type=int, default=200)
    opts = parser.parse_args()
    plain = measure(gear.Server, PlainClient, gear.Worker, opts.rounds)
    fast = measure(NoDelayServer, FastClient, NoDelayWorker, opts.rounds)
    p_med, f_med = statistics.median(plain), statistics.median(fast)
    print(f"gear 0.16 plain     : {p_med:7.3f} ms median, {statistics.mean(plain):7.3f} ms mean")
    print(f"with TCP_NODELAY    : {f_med:7.3f} ms median, {statistics.mean(fast):7.3f} ms mean")
    print(f"ratio plain/nodelay : {p_med / f_med:7.1f}x  ({opts.rounds} round trips each)")


if __name__ == "__main__":
    main()
