"""The build history: what one report costs the scheduler, and what the
web's history queries cost as the history grows.

Writes N build sets of 5 builds each to a fresh SQLite file (as the
scheduler does at each report: one transaction, idempotent by uuid), then
times /api/builds filtered by job, /api/builds?change=, /api/build/<uuid>
and /api/buildsets through the real uvicorn server on loopback.

    .venv/bin/python bench/history.py [-n 2000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from tests.test_history import make_item  # noqa: E402
from zuul_lite.history.db import HistoryDB  # noqa: E402
from zuul_lite.history.records import item_record  # noqa: E402
from zuul_lite.web.app import create_app  # noqa: E402
from zuul_lite.web.server import WebServer  # noqa: E402

JOBS = ("kernel-checkpatch", "kernel-build", "kernel-build-warnings", "kernel-boot-qemu", "kunit")


def ms(samples: list[float]) -> str:
    return f"median {statistics.median(samples) * 1000:.2f} ms, max {max(samples) * 1000:.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=2000, help="build sets to write")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = HistoryDB(f"sqlite:///{tmp}/history.sqlite")
        started = time.perf_counter()
        db.upgrade()
        print(f"migration of an empty database: {(time.perf_counter() - started) * 1000:.0f} ms")
        writes, last = [], None
        for number in range(1, args.n + 1):
            item = make_item(number, dict.fromkeys(JOBS, "SUCCESS"))
            record = item_record(item, "SUCCESS")
            started = time.perf_counter()
            db.record(record)
            writes.append(time.perf_counter() - started)
            last = record
        print(f"record one build set of {len(JOBS)} builds ({args.n} times): {ms(writes)}")
        started = time.perf_counter()
        db.record(last)
        print(f"record it again (a restart): {(time.perf_counter() - started) * 1000:.2f} ms")
        server = WebServer(create_app(mock.Mock(), Path(tmp), history=db), port=0)
        server.start()
        try:
            with httpx.Client(base_url=server.url) as client:
                queries = {
                    "/health": None,  # the server's own cost, no SQL
                    "/api/builds?job=kernel-build": None,
                    f"/api/builds?change={args.n // 2}": None,
                    f"/api/build/{last.builds[0].uuid}": None,
                    "/api/buildsets?result=SUCCESS&limit=50": None,
                    "/api/time-to-vote": None,
                }
                for path in queries:
                    samples = []
                    for _ in range(50):
                        started = time.perf_counter()
                        client.get(path).raise_for_status()
                        samples.append(time.perf_counter() - started)
                    print(f"GET {path}: {ms(samples)}")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
