"""Flaky results: a rerun-on-failure job that fails is run once more on a
fresh node (a new build, a new uuid) before its result counts; a flip is
reported as flaky, counted per project and job, and does not decide the vote.
Real ZooKeeper, gear, git and merger; the stand-in launcher answers builds
(tests/harness.py), here with a list of results per job: one per build."""

from __future__ import annotations

import pytest

from nodepool_lite.zk import ZooKeeper
from tests.harness import (
    StandInLauncher,
    make_project,
    make_series,
    settle,
    wait_for_votes,
    write_config,
)
from zuul_lite import config as zconfig
from zuul_lite.cmd.client import format_status
from zuul_lite.cmd.client import main as zuul_lite_cli
from zuul_lite.connections.local import LocalConnection
from zuul_lite.git import git
from zuul_lite.scheduler import Scheduler
from zuul_lite.state import FlakeCount, ZuulState


class Flaky:
    def __init__(self, tmp_path, zk_hosts) -> None:
        self.tmp = tmp_path
        self.zk_hosts = zk_hosts
        self.cfg = zconfig.load(write_config(tmp_path, zk_hosts, layout="flaky.yaml"))
        self.zk = ZooKeeper(zk_hosts)
        self.zk.connect()
        self.state = ZuulState(self.zk)
        self.src = make_project(tmp_path)
        self.local = LocalConnection("local", {"driver": "local"}, self.state, self.cfg.state_dir)
        self.local.import_project("demo", self.src)
        self.sched: Scheduler | None = None
        self.sched_zk: ZooKeeper | None = None
        self.launcher: StandInLauncher | None = None

    def start(self, results: dict, hold: bool = False) -> None:
        # The scheduler on a session of its own: a restart drops its watches.
        self.sched_zk = ZooKeeper(self.zk_hosts)
        self.sched_zk.connect()
        self.sched = Scheduler(self.cfg, self.sched_zk)
        self.sched.start()
        if self.launcher is None:
            self.launcher = StandInLauncher(self.zk, self.sched.gearman_port, results)
            self.launcher.hold = hold
            self.launcher.start()

    def stop_scheduler(self) -> None:
        self.sched.stop()
        self.sched_zk.disconnect()
        self.sched = None

    def change(self, name: str) -> int:
        out = make_series(self.src, self.tmp / f"series-{name}", [(f"{name}.txt", name, name)])
        number, _ = self.local.submit(out, "demo")
        return number

    def settle(self) -> None:
        settle(self.sched, self.launcher)

    def votes(self, number: int, pipeline: str) -> list[dict]:
        votes = self.local.get_change_data(number)["votes"]
        return [v for v in votes if v["pipeline"] == pipeline]

    def history(self, job: str) -> list[tuple[str, str]]:
        """(result, uuid) of each build of `job`, in the order they ended."""
        return [(h["result"], h["uuid"]) for h in self.launcher.history if h["name"] == job]

    def close(self) -> None:
        if self.launcher is not None:
            self.launcher.stop()
        if self.sched is not None:
            self.stop_scheduler()
        self.zk.disconnect()


@pytest.fixture
def env(tmp_path, zk_hosts):
    e = Flaky(tmp_path, zk_hosts)
    yield e
    e.close()


def test_flip_is_flaky_and_passes(env: Flaky) -> None:
    env.start({"smoke": ["FAILURE", "SUCCESS"]})
    a = env.change("a")
    (vote,) = wait_for_votes(env.zk, a)
    env.settle()
    assert vote["value"] == 1
    first, rerun = env.history("smoke")
    assert (first[0], rerun[0]) == ("FAILURE", "SUCCESS")
    assert first[1] != rerun[1]  # a new build: a new uuid, a fresh node
    assert (
        f"- smoke http://logs/{a}/1/check/smoke/{rerun[1]}/ : SUCCESS in 2s (flaky: FAILURE "
        f"http://logs/{a}/1/check/smoke/{first[1]}/, then SUCCESS on a fresh node)"
    ) in vote["message"]
    assert "Build succeeded." in vote["message"]
    assert env.state.flake_counts() == [FlakeCount("demo", "smoke", runs=1, flips=1)]
    # Taken again (a scheduler restarted before it stored the item): not counted twice.
    env.state.count_flake("demo", "smoke", rerun[1], flipped=True)
    env.state.count_flake("linux/net", "boot", "b1", flipped=False)  # a slash in its name
    assert env.state.flake_counts() == [
        FlakeCount("demo", "smoke", runs=1, flips=1),
        FlakeCount("linux/net", "boot", runs=1, flips=0),
    ]


def test_a_test_that_flips_is_named_and_counted_per_test(env: Flaky, capsys) -> None:
    """The first run fails suite.a and suite.b (its findings say so), the
    rerun fails only suite.b... and passes as a whole (suite.b already fails
    on base): suite.a flipped, and only it is named and counted."""
    env.start({"smoke": ["FAILURE", "SUCCESS"]})
    env.launcher.findings["smoke"] = [
        {"tests": {"suite.a": "FAIL", "suite.b": "FAIL", "suite.c": "PASS"}},
        {"tests": {"suite.a": "PASS", "suite.b": "FAIL", "suite.c": "PASS"}},
    ]
    a = env.change("a")
    (vote,) = wait_for_votes(env.zk, a)
    env.settle()
    assert vote["value"] == 1
    assert "then SUCCESS on a fresh node; flaky tests: suite.a)" in vote["message"]
    [count] = env.state.flake_counts()
    assert count.tests == {"suite.a": 1}
    assert zuul_lite_cli(["-c", str(env.tmp / "zuul.yaml"), "flakes"]) == 0
    assert capsys.readouterr().out.splitlines()[-2:] == [
        "Flaky tests (failed, then passed on a fresh node):",
        "  demo smoke suite.a: flipped in 1 of 1 runs (100.0%)",
    ]


def test_second_failure_fails_and_other_jobs_are_not_rerun(env: Flaky, capsys) -> None:
    env.start({"smoke": "FAILURE", "lint": "FAILURE"})
    a = env.change("a")
    (vote,) = wait_for_votes(env.zk, a)
    env.settle()
    assert vote["value"] == -1
    assert [r for r, _ in env.history("smoke")] == ["FAILURE", "FAILURE"]
    assert [r for r, _ in env.history("lint")] == ["FAILURE"]  # no rerun-on-failure
    assert "- lint http://logs/" in vote["message"]
    assert "(the first run, on another node: FAILURE http://logs/" in vote["message"]
    assert env.state.flake_counts() == [FlakeCount("demo", "smoke", runs=1, flips=0)]
    assert zuul_lite_cli(["-c", str(env.tmp / "zuul.yaml"), "flakes"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "PROJECT  JOB    RUNS  FLIPS  RATE",
        "demo     smoke     1      0  0.0%",
    ]


def test_early_failure_of_a_build_rerun_does_not_reset_the_gate(env: Flaky) -> None:
    env.start({})
    a, b = env.change("a"), env.change("b")
    wait_for_votes(env.zk, b)
    env.settle()
    env.launcher.results = {f"smoke:{a}": ["FAILURE", "SUCCESS"]}
    env.launcher.hold = True
    env.local.approve(a)
    env.local.approve(b)
    env.launcher.wait_for_builds(4, held=True)
    env.launcher.early_fail("smoke")  # A's smoke says it will fail...
    env.settle()
    env.launcher.release("smoke", change=a)  # ...and fails: it is run once more
    env.launcher.wait_for_builds(4, held=True)
    env.settle()
    # B still runs on top of A: not reset for a failure the rerun may undo.
    assert sorted(env.launcher.held_builds()) == [
        ("lint", "1,1"),
        ("lint", "1,1 2,1"),
        ("smoke", "1,1"),
        ("smoke", "1,1 2,1"),
    ]
    gate_builds = [b for b in env.launcher.builds if b["pipeline"] == "gate"]
    assert len(gate_builds) == 5  # four, and A's smoke once more
    env.launcher.hold = False
    env.launcher.release()
    wait_for_votes(env.zk, b, count=2)
    env.settle()
    assert [v["value"] for v in env.votes(a, "gate")] == [1]
    assert "flaky: FAILURE" in env.votes(a, "gate")[0]["message"]
    assert [v["value"] for v in env.votes(b, "gate")] == [1]
    assert git(env.local.repo_path("demo"), "log", "--format=%s", "master").split() == [
        "b",
        "a",
        "Initial",
        "commit",
    ]
    # Two check and two gate runs of smoke ended; one flipped.
    assert env.state.flake_counts() == [FlakeCount("demo", "smoke", runs=4, flips=1)]


def test_scheduler_restart_between_the_failure_and_the_rerun(env: Flaky) -> None:
    env.start({"smoke": ["FAILURE", "SUCCESS"]}, hold=True)
    a = env.change("a")
    env.launcher.wait_for_builds(2, held=True)
    env.launcher.release("smoke")
    env.launcher.wait_for_builds(3)  # the rerun, held
    env.settle()
    env.stop_scheduler()
    status = format_status(env.state.read_status())
    assert "smoke: queued (run once more after FAILURE)" in status
    env.start({})
    env.launcher.hold = False
    env.launcher.release()  # results in ZooKeeper, for the new scheduler
    (vote,) = wait_for_votes(env.zk, a)
    env.settle()
    assert len(env.votes(a, "check")) == 1
    assert vote["value"] == 1
    assert "flaky: FAILURE" in vote["message"]
    assert [r for r, _ in env.history("smoke")] == ["FAILURE", "SUCCESS"]
    assert len(env.launcher.builds) == 3
    assert env.state.flake_counts() == [FlakeCount("demo", "smoke", runs=1, flips=1)]
