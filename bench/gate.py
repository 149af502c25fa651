"""Gate throughput: 10 approved series with instant jobs against one series.

Goal: 10 approved series merge in <= 1.3x the time of one series, and in
<= 2.3x when the 3rd fails; also printed: the ratio to running the 10 one at
a time (approve, wait for the merge, approve the next).

A real ZooKeeper (fsync off), the scheduler in this process with its gear
server, the real merger (git am) and the local inbox's gate merge (the
merge's objects linked in, the branch moved by compare-and-set);
a StandInLauncher (tests/harness.py) answers `lint` and `build` at once.
Each series is one patch adding its own file, so none conflict. Waits are
DataWatches on the changes (a gate vote, status MERGED), never sleeps.

Where the time goes is printed with each figure: the merges and the runs of
the merger they took, the pushes, the builds, and the ZooKeeper
transactions and git processes started in this process (per series), which
the load of a shared machine does not change, unlike the times; and the CPU
each phase took (this process, its git children, ZooKeeper). A gate run
that passed lands with one push and is reported in one transaction, and the
trigger events of a wake-up are stored in one (doc/architecture.md), so these
grow by much less than one per series.

Measured 2026-12-03 on the shared 2-core machine, load average 0.4-3.8,
three runs each, alternating with the code before runs were batched: (b)
0.90-1.01 s against 1.10-1.30 s, b/a 3.9-4.7x (before: 4.8-5.7x), 2.2-2.7
transactions and 2.4-2.8 git processes per series (before: 3.7-4.1 and
4.8-4.9); (c) c/a 4.8-7.0x (before: 5.6-7.1x).

Measured 2026-12-03 (later), after a landing hard-links the merge's objects
into the local review repository and moves the branch by compare-and-set
instead of a `git push` (seven processes, ~50 ms quiet), at load 1.1-1.9
beside another session: (a) 0.148-0.214 s (0.237-0.294 s for the code
before, alternated at load 3), pushes 17-27 ms each (60-80); (b)
0.82-0.97 s; (c) 1.13-1.45 s; b/a 4.5-5.5x, c/a 6.9-7.7x. A faster single
series makes the ratios no better: (b) is bound by its work. The CPU line
says so: (b) takes ~5x the CPU of (a) (1.3 s against 0.26 s: this process
0.5, git 0.2-0.3, ZooKeeper 0.5), so two cores cannot finish it in under
~3.1x the time of (a) even with nothing else running. What it costs per
series is mostly per build: the builds' znodes, watches and results in
ZooKeeper (392 requests for (b) against 64 for (a), counted at the kazoo
client), the launchers' gear round trips, and one `git am` patch each. The
goals (1.3x, 2.3x) would need a gate run's ten series to cost about what
one costs, i.e. batching the builds themselves (one gear job and one
result for a run's job), which the build contract (one job per build, its
own result and logs) does not allow.

    .venv/bin/python bench/gate.py [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor

from _zuul_env import CpuCounter, WorkCounter, ZuulEnv, median, quiet_logs

from tests.harness import settle

LAYOUT = {
    "pipelines": [
        {
            "name": "gate",
            "manager": "dependent",
            "source": "local",
            "trigger": {"local": [{"event": "change-approved"}]},
            "success": {"local": {"verified": 1, "submit": True}},
            "failure": {"local": {"verified": -1}},
            "window": 20,
        }
    ],
    "projects": [{"name": "demo", "gate": {"jobs": ["lint", "build"]}}],
}
SERIES = 10
FAILING = 2  # index of the 3rd series
TIMEOUT = 90.0


def gate_voted(data: dict) -> bool:
    return any(v["pipeline"] == "gate" for v in data.get("votes", []))


class Counters:
    """Wraps the merger's merge and push (on this process's objects) to count
    them and their time: where the time of a gate run goes."""

    def __init__(self, env: ZuulEnv) -> None:
        merger = env.sched.merger.merger
        self.merges = self.batches = self.pushes = 0
        self.merge_time = self.push_time = 0.0
        merge_chain, push = merger.merge_chain, merger.push

        def timed_merge(reqs):
            start = time.perf_counter()
            try:
                return merge_chain(reqs)
            finally:
                self.merges += len(reqs)
                self.batches += 1
                self.merge_time += time.perf_counter() - start

        def timed_push(*args, **kwargs):
            start = time.perf_counter()
            try:
                return push(*args, **kwargs)
            finally:
                self.pushes += 1
                self.push_time += time.perf_counter() - start

        merger.merge_chain, merger.push = timed_merge, timed_push
        self.launchers = env.launchers
        self.work = WorkCounter()
        self.cpu = CpuCounter(env.zk_server.proc.pid)
        self.last_cpu = 0.0  # CPU seconds of the last phase measured by `since`

    def snapshot(self) -> tuple:
        return (
            self.merges,
            self.batches,
            self.merge_time,
            self.pushes,
            self.push_time,
            sum(len(launcher.history) for launcher in self.launchers),
            self.work.snapshot(),
            self.cpu.snapshot(),
        )

    def since(self, before: tuple, series: int) -> str:
        m, mb, mt, p, pt, b = (
            now - then for now, then in zip(self.snapshot()[:-2], before[:-2], strict=True)
        )
        own, git, zk = self.cpu.since(before[-1])
        self.last_cpu = own + git + zk
        return (
            f"{m:3d} merges in {mb:2d} runs of the merger ({mt:5.2f} s, "
            f"{1000 * mt / max(mb, 1):5.1f} ms a run), "
            f"{p:2d} pushes ({pt:4.2f} s), {b:3d} builds\n"
            f"      {self.work.since(before[-2], series).replace('per item', 'per series')}\n"
            f"      CPU {self.last_cpu:5.2f} s: this process {own:4.2f} (scheduler, merger, "
            f"stand-in launchers), git {git:4.2f}, ZooKeeper {zk:4.2f}"
        )


def set_results(env: ZuulEnv, results: dict[str, str]) -> None:
    for launcher in env.launchers:
        launcher.results = results


def run_together(env: ZuulEnv, numbers: list[int]) -> float:
    """Approve all at once, as reviewers would, each from a thread of its own
    (one after the other, the bench's own round trips would be measured);
    seconds until every one has its gate vote."""
    watch = env.watch(numbers, gate_voted)
    start = time.monotonic()
    with ThreadPoolExecutor(len(numbers)) as reviewers:
        list(reviewers.map(env.local.approve, numbers))
    end = watch.wait(TIMEOUT, env)
    settle(env.sched, env.launchers)
    return end - start


def run_one(env: ZuulEnv, number: int) -> float:
    return run_together(env, [number])


def outcome(env: ZuulEnv, numbers: list[int]) -> str:
    merged = failed = 0
    for n in numbers:
        data = env.local.get_change_data(n)
        votes = [v["value"] for v in data["votes"] if v["pipeline"] == "gate"]
        if data["status"] == "MERGED" and votes == [1]:
            merged += 1
        elif votes == [-1]:
            failed += 1
    return f"{merged} merged, {failed} voted -1"


def surprises(env: ZuulEnv, numbers: list[int], failing: int | None = None) -> None:
    """One line per change that did not end as expected (a scheduler bug, not timing)."""
    for n in numbers:
        data = env.local.get_change_data(n)
        votes = [v for v in data["votes"] if v["pipeline"] == "gate"]
        want = [-1] if n == failing else [1]
        if [v["value"] for v in votes] != want or (n != failing) != (data["status"] == "MERGED"):
            first = votes[-1]["message"].split("\n")[0] if votes else "no vote"
            values = [v["value"] for v in votes]
            print(f"      ! change {n}: {data['status']}, votes {values}: {first}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="runs of the single series (median)")
    parser.add_argument(
        "--launchers", type=int, default=4, help="stand-in launchers taking builds at once"
    )
    opts = parser.parse_args()
    quiet_logs()
    print(
        f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
        f"({os.cpu_count()} CPUs)"
    )
    t_setup = time.monotonic()
    env = ZuulEnv(LAYOUT, launchers=opts.launchers)
    try:
        count = 1 + opts.reps + 3 * SERIES
        patches = env.patches("s", count)
        numbers = [env.submit(p) for p in patches]  # patchset-created: no pipeline wants it
        settle(env.sched, env.launchers)
        warm, numbers = numbers[0], numbers[1:]
        singles, numbers = numbers[: opts.reps], numbers[opts.reps :]
        together, numbers = numbers[:SERIES], numbers[SERIES:]
        failing, serial = numbers[:SERIES], numbers[SERIES:]
        counters = Counters(env)
        run_one(env, warm)  # the merger clones its workspace on the first merge
        print(
            f"setup: ZooKeeper, scheduler, {count} series submitted, warm-up merge: "
            f"{time.monotonic() - t_setup:.1f} s"
        )

        before = counters.snapshot()
        one = [run_one(env, n) for n in singles]
        a = median(one)
        print(
            f"(a) 1 series, approve -> merged     : {a:6.3f} s  (median of "
            f"{len(one)}: {', '.join(f'{t:.3f}' for t in one)})"
        )
        print(f"      {counters.since(before, len(one))} in {len(one)} runs")
        cpu_a = counters.last_cpu / len(one)

        before = counters.snapshot()
        b = run_together(env, together)
        print(
            f"(b) {SERIES} series at once -> all merged: {b:6.3f} s  [{outcome(env, together)}; "
            f"expected {SERIES} merged]"
        )
        print(f"      {counters.since(before, SERIES)}")
        cpu_b = counters.last_cpu
        surprises(env, together)

        set_results(env, {f"build:{failing[FAILING]}": "FAILURE"})
        before = counters.snapshot()
        c = run_together(env, failing)
        set_results(env, {})
        print(
            f"(c) {SERIES} at once, 3rd build fails    : {c:6.3f} s  [{outcome(env, failing)}; "
            f"expected {SERIES - 1} merged, 1 voted -1]"
        )
        print(f"      {counters.since(before, SERIES)}")
        surprises(env, failing, failing[FAILING])

        before = counters.snapshot()
        start = time.monotonic()
        for n in serial:
            run_one(env, n)
        d = time.monotonic() - start
        print(f"(d) {SERIES} one at a time (serial)     : {d:6.3f} s  [{outcome(env, serial)}]")
        print(f"      {counters.since(before, SERIES)}")
        surprises(env, serial)

        print()
        print(f"b/a  10 at once / 1 series      : {b / a:5.2f}x   (goal <= 1.3x)")
        print(f"c/a  10 with 3rd failing / 1    : {c / a:5.2f}x   (goal <= 2.3x)")
        print(
            f"CPU  10 at once / 1 series      : {cpu_b / cpu_a:5.2f}x   (the work; with 2 cores "
            f"(b) takes at least {cpu_b / 2:.3f} s of it: b/a >= {cpu_b / 2 / a:.2f}x)"
        )
        print(f"d/b  serial / at once           : {d / b:5.2f}x   (gain of gating together)")
        print(f"per series: at once {1000 * b / SERIES:.0f} ms, serial {1000 * d / SERIES:.0f} ms")
        print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        env.close()


if __name__ == "__main__":
    main()
