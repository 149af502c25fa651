"""Faults around the gate (issue point 11): bad events, an item that raises,
launchers killed or stopped mid-build, a scheduler killed mid-gate, a merger
error, a crash between a report and the item's removal. Real ZooKeeper, gear,
git and merger; the stand-in launcher answers builds (tests/harness.py)."""

from __future__ import annotations

import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time

import gear
import pytest

from nodepool_lite.exceptions import BadVersionError
from nodepool_lite.zk import ZooKeeper
from tests.harness import (
    REPO_ROOT,
    StandInLauncher,
    make_project,
    make_series,
    pipeline_status,
    queue_shape,
    settle,
    start_scheduler_process,
    votes_in,
    wait_for_votes,
    wait_until,
    write_config,
)
from zuul_lite import config as zconfig
from zuul_lite.connections import Report
from zuul_lite.connections.local import LocalConnection
from zuul_lite.gearman import EXECUTE
from zuul_lite.git import git
from zuul_lite.merger import MergeResult
from zuul_lite.model import ManagementEvent
from zuul_lite.scheduler import Scheduler
from zuul_lite.state import ZuulState


class Env:
    """A project in the local inbox, a scheduler on `layout`, a stand-in launcher."""

    def __init__(self, tmp, zk_hosts: str) -> None:
        self.tmp, self.zk_hosts = tmp, zk_hosts
        self.zk = ZooKeeper(zk_hosts)
        self.zk.connect()
        self.state = ZuulState(self.zk)
        self.src = make_project(tmp)
        self.sched: Scheduler | None = None
        self.launcher: StandInLauncher | None = None
        self.cfg = None
        self.local: LocalConnection | None = None

    def configure(self, layout: str = "gate.yaml") -> None:
        self.cfg = zconfig.load(write_config(self.tmp, self.zk_hosts, layout=layout))
        self.local = LocalConnection("local", {"driver": "local"}, self.state, self.cfg.state_dir)
        self.local.import_project("demo", self.src)

    def start(self, layout: str = "gate.yaml", hold: bool = True, launcher: bool = True) -> Env:
        self.configure(layout)
        self.sched = Scheduler(self.cfg, self.zk)
        self.sched.start()
        if launcher:
            self.start_launcher(hold)
        return self

    def start_launcher(self, hold: bool = False) -> StandInLauncher:
        self.launcher = StandInLauncher(self.zk, self.cfg.gearman_port)
        self.launcher.hold = hold
        self.launcher.start()
        return self.launcher

    def change(self, name: str) -> int:
        """A one-patch change adding its own file, with its check vote in."""
        out = make_series(self.src, self.tmp / f"series-{name}", [(f"{name}.txt", name, name)])
        number, _ = self.local.submit(out, "demo")
        return number

    def checked(self, *numbers: int) -> None:
        for n in numbers:
            wait_for_votes(self.zk, n, 1)

    def approve(self, *numbers: int) -> None:
        for n in numbers:
            self.local.approve(n)
        self.settle()

    def settle(self) -> None:
        settle(self.sched, self.launcher)

    def running(self) -> list[tuple[str, str]]:
        self.settle()
        return sorted(self.launcher.held_builds())

    def branch_log(self) -> list[str]:
        return git(self.local.repo_path("demo"), "log", "--format=%s", "master").split("\n")[:-1]

    def gate_votes(self, number: int) -> list[int | None]:
        return votes_in(self.zk, number, "gate")

    def vote_messages(self, number: int, pipeline: str = "gate") -> list[str]:
        votes = self.local.get_change_data(number)["votes"]
        return [v["message"] for v in votes if v["pipeline"] == pipeline]

    def close(self) -> None:
        if self.launcher is not None:
            self.launcher.stop()
        if self.sched is not None:
            self.sched.stop()
        self.zk.disconnect()


@pytest.fixture
def env(tmp_path, zk_hosts):
    e = Env(tmp_path, zk_hosts)
    yield e
    e.close()


# 1. Malformed trigger events ---------------------------------------------------


def _records(caplog, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if text in r.getMessage()]


def test_malformed_trigger_events_are_dropped(env, caplog):
    caplog.set_level(logging.INFO, logger="zuul_lite")
    env.start(hold=False)
    garbage = env.state.put_trigger_event({"hello": "world", "change": "x"}).rsplit("/", 1)[1]
    unknown = env.state.put_trigger_event(
        {
            "id": "event-for-nowhere",
            "type": "patchset-created",
            "connection": "nowhere",
            "project": "demo",
            "branch": "master",
            "change": 1,
            "patchset": 1,
        }
    )
    no_change = env.state.put_trigger_event(
        {
            "id": "event-without-change",
            "type": "change-approved",
            "connection": "local",
            "project": "demo",
            "branch": "master",
            "change": 4242,
            "patchset": 1,
        }
    )
    assert unknown and no_change
    a = env.change("a")
    votes = wait_for_votes(env.zk, a)
    env.settle()
    assert [v["value"] for v in votes] == [1]
    assert env.state.trigger_events() == []
    for text, level, sentence in (
        (garbage, logging.ERROR, r"Dropped malformed trigger event event-\d+: .+"),
        ("event-for-nowhere", logging.WARNING, r".*dropped: no connection named nowhere$"),
        ("event-without-change", logging.WARNING, r".*dropped: There is no change 4242\.$"),
    ):
        found = _records(caplog, text)
        assert len(found) == 1, [r.getMessage() for r in found]
        record = found[0]
        assert record.levelno == level and record.exc_info is None
        assert "\n" not in record.getMessage() and re.match(sentence, record.getMessage())
    assert not [r for r in caplog.records if "Scheduler loop error" in r.getMessage()]


def _put_raw_trigger_event(zk: ZooKeeper, raw: bytes) -> str:
    """A trigger event znode whose bytes are not a JSON object at all."""
    path = zk.client.create(
        ZuulState(zk).trigger_event_path("event-"), raw, sequence=True, makepath=True
    )
    return path.rsplit("/", 1)[1]


@pytest.mark.parametrize("raw", [b"[1, 2, 3]", b"not json {"], ids=["json-list", "not-json"])
def test_trigger_event_that_is_not_a_json_object_is_dropped(env, caplog, raw):
    caplog.set_level(logging.INFO, logger="zuul_lite")
    env.start(hold=False)
    name = _put_raw_trigger_event(env.zk, raw)
    a = env.change("a")
    votes = wait_for_votes(env.zk, a, timeout=10)
    assert [v["value"] for v in votes] == [1]
    assert len(_records(caplog, name)) == 1


# 2. One item that raises ---------------------------------------------------------


def test_item_that_raises_is_reported_without_a_vote(env, monkeypatch):
    env.start()
    a, b, c = (env.change(n) for n in "abc")
    env.checked(a, b, c)
    conn = env.sched.connections["local"]
    real_many = conn.get_series_many

    def get_series_many(changes):
        # The series of a pass are read together, each or its error.
        read = real_many(changes)
        return [
            RuntimeError("the series of change 2 is unreadable") if change.number == b else series
            for change, series in zip(changes, read, strict=True)
        ]

    monkeypatch.setattr(conn, "get_series_many", get_series_many)
    env.approve(a, b, c)
    # B is reported at once, with no vote, and leaves the queue; C goes on top of A.
    assert env.gate_votes(b) == [None]
    message = env.vote_messages(b)[0]
    assert "ERROR" in message and "No vote: this is not the change's fault." in message
    assert (
        "zuul-lite hit an internal error on this change "
        "(RuntimeError: the series of change 2 is unreadable)." in message
    )
    assert [i["change"]["number"] for i in pipeline_status(env.zk, "gate")] == [a, c]
    assert env.running() == [
        ("build", "1,1"),
        ("build", "1,1 3,1"),
        ("lint", "1,1"),
        ("lint", "1,1 3,1"),
    ]
    env.launcher.hold = False
    env.launcher.release()
    wait_for_votes(env.zk, c, 2)
    env.settle()
    assert env.gate_votes(a) == [1] and env.gate_votes(c) == [1]
    assert env.gate_votes(b) == [None]
    assert env.branch_log() == ["c", "a", "Initial commit"]
    assert env.local.get_change_data(b)["status"] == "NEW"
    assert pipeline_status(env.zk, "gate") == []


# 3. zuul-launcher killed with -9 mid-build ---------------------------------------

DOOMED_LAUNCHER = """
import json, sys, threading
import gear
from nodepool_lite.zk import ZooKeeper
from zuul_lite.state import ZuulState

hosts, port = sys.argv[1], int(sys.argv[2])
zk = ZooKeeper(hosts, timeout=4)
zk.connect()
worker = gear.Worker("doomed-launcher")
worker.addServer("127.0.0.1", port)
worker.waitForServer()
worker.registerFunction("launcher:execute")
job = worker.getJob()
uuid = json.loads(job.arguments)["uuid"]
assert ZuulState(zk).claim_build(uuid, "doomed")
job.sendWorkData(json.dumps({"phase": "run", "uuid": uuid}).encode())
print(json.dumps({"uuid": uuid, "job": json.loads(job.arguments)["job"]}), flush=True)
threading.Event().wait()  # runs the build until killed
"""


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"the process said nothing in {timeout}s"
    return proc.stdout.readline()


def test_launcher_killed_mid_build_is_run_again_under_a_new_uuid(env):
    env.start(layout="demo.yaml", launcher=False)
    proc = subprocess.Popen(
        [sys.executable, "-c", DOOMED_LAUNCHER, env.zk_hosts, str(env.sched.gearman_port)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        a = env.change("a")
        doomed = json.loads(_read_line(proc, 30))
        assert env.state.build_running(doomed["uuid"])
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    launcher = env.start_launcher()
    votes = wait_for_votes(env.zk, a, timeout=30)
    env.settle()
    assert [v["value"] for v in votes] == [1]
    ran = {b["uuid"]: b["job"] for b in launcher.builds}
    assert doomed["uuid"] not in ran
    assert sorted(ran.values()) == ["boot", "build", "lint"]
    assert "ABORTED" not in votes[0]["message"] and "RETRY_LIMIT" not in votes[0]["message"]
    # The vote shows the build that ran again, not the lost one.
    assert doomed["uuid"] not in votes[0]["message"]
    assert not env.zk.exists(f"/zuul/builds/{doomed['uuid']}")


# 4. zuul-launcher stopped gracefully mid-build -----------------------------------


class GracefulStop(threading.Thread):
    """A launcher stopping gracefully: it takes one build, claims it, then
    gives it back without a result (releases its claim, sends WORK_FAIL)."""

    def __init__(self, zk: ZooKeeper, port: int, sched: Scheduler, release_first: bool):
        super().__init__(daemon=True)
        self.state = ZuulState(zk)
        self.sched = sched
        self.release_first = release_first
        self.worker = gear.Worker("graceful-launcher")
        self.worker.addServer("127.0.0.1", port)
        self.uuid: str | None = None

    def run(self) -> None:
        self.worker.waitForServer()
        self.worker.registerFunction(EXECUTE)
        job = self.worker.getJob()
        self.uuid = json.loads(job.arguments)["uuid"]
        assert self.state.claim_build(self.uuid, "graceful")
        settle(self.sched)  # the scheduler has seen the claim
        if self.release_first:  # what zuul-launcher does (launcher/build.py)
            self.state.release_build(self.uuid)
            job.sendWorkFail()
        else:
            job.sendWorkFail()
            settle(self.sched)  # the WORK_FAIL was handled while the claim stood
            self.state.release_build(self.uuid)
        self.worker.shutdown()


@pytest.mark.parametrize("release_first", [True, False], ids=["release-fail", "fail-release"])
def test_launcher_stopped_gracefully_retries_the_build(env, release_first):
    env.start(layout="demo.yaml", launcher=False)
    graceful = GracefulStop(env.zk, env.sched.gearman_port, env.sched, release_first)
    graceful.start()
    a = env.change("a")
    graceful.join(30)
    assert not graceful.is_alive() and graceful.uuid
    launcher = env.start_launcher()
    votes = wait_for_votes(env.zk, a, timeout=30)
    env.settle()
    assert [v["value"] for v in votes] == [1]
    assert "ABORTED" not in votes[0]["message"]
    ran = {b["uuid"]: b["job"] for b in launcher.builds}
    assert graceful.uuid not in ran
    assert sorted(ran.values()) == ["boot", "build", "lint"]
    assert all(h["result"] == "SUCCESS" for h in launcher.history)


# 5. The scheduler killed with -9 mid-gate -----------------------------------------


def _build_uuids(zk: ZooKeeper) -> dict[int, dict[str, str]]:
    return {
        i["change"]["number"]: {job: b["uuid"] for job, b in i["buildset"]["builds"].items()}
        for i in pipeline_status(zk, "gate")
    }


def _builds_done(zk: ZooKeeper, wanted: dict[int, set[str]]) -> bool:
    items = {i["change"]["number"]: i for i in pipeline_status(zk, "gate")}
    return all(
        n in items and all(items[n]["buildset"]["builds"][j]["state"] == "completed" for j in jobs)
        for n, jobs in wanted.items()
    )


def test_scheduler_killed_mid_gate_resumes_in_order(env):
    env.configure("gate.yaml")
    proc = start_scheduler_process(env.cfg.path, env.tmp / "sched1.log")
    proc2 = None
    launcher = env.start_launcher(hold=True)
    launcher2 = None
    try:
        a, b, c = (env.change(n) for n in "abc")
        env.checked(a, b, c)
        for n in (a, b, c):
            env.local.approve(n)
        launcher.wait_for_builds(6, held=True)
        wait_until(
            lambda: (
                all(
                    build["state"] == "queued"
                    for i in pipeline_status(env.zk, "gate")
                    for build in i["buildset"]["builds"].values()
                )
                and len(pipeline_status(env.zk, "gate")) == 3
            ),
            what="three gate items with their builds stored",
        )
        before = queue_shape(env.zk, "gate")
        uuids = _build_uuids(env.zk)
        assert [n for n, _, _ in before] == [a, b, c]
        assert [ahead for _, _, ahead in before] == [None, before[0][1], before[1][1]]
        held = {args["uuid"] for _, args in launcher.held}
        assert held == {u for jobs in uuids.values() for u in jobs.values()}

        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        launcher.stop()  # its worker must not reconnect to the next gear server
        # Builds go on without a scheduler: their results land in ZooKeeper.
        launcher.release(change=c)
        launcher.release(change=b)
        launcher.release("lint", change=a)

        proc2 = start_scheduler_process(env.cfg.path, env.tmp / "sched2.log")
        launcher2 = StandInLauncher(env.zk, env.cfg.gearman_port)
        launcher2.start()
        wait_until(
            lambda: _builds_done(
                env.zk, {a: {"lint"}, b: {"lint", "build"}, c: {"lint", "build"}}
            ),
            what="the new scheduler to take the results stored while it was down",
        )
        assert queue_shape(env.zk, "gate") == before
        assert _build_uuids(env.zk) == uuids
        assert votes_in(env.zk, a, "gate") == []

        launcher.release()  # A's build ends: A, B and C merge
        wait_for_votes(env.zk, c, 2, timeout=30)
        wait_until(
            lambda: not pipeline_status(env.zk, "gate") and not env.state.report_uuids(),
            what="the gate to empty",
        )
        assert env.branch_log() == ["c", "b", "a", "Initial commit"]
        expected = {a: "1,1", b: "1,1 2,1", c: "1,1 2,1 3,1"}
        history = {h["uuid"]: h for h in launcher.history}
        for n in (a, b, c):
            assert votes_in(env.zk, n, "gate") == [1]
            assert env.local.get_change_data(n)["status"] == "MERGED"
            (message,) = env.vote_messages(n)
            reported = dict(
                re.findall(r"^- (\w+) http://logs/[^ ]*/(\w+)/ : SUCCESS", message, re.M)
            )
            assert reported == uuids[n]
            for job, uuid in reported.items():
                # Each result counted is the one of that very build.
                assert (history[uuid]["name"], history[uuid]["changes"]) == (job, expected[n])
        assert launcher2.builds == []  # nothing ran twice
    finally:
        for p in (proc, proc2):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait()
        if launcher2 is not None:
            launcher2.stop()


# 6. The merger hit by an unexpected error ----------------------------------------


def _failing_merger(env, monkeypatch, failures: int) -> list[tuple[float, str]]:
    merger = env.sched.merger.merger
    real = merger.merge
    calls: list[tuple[float, str]] = []

    def merge(req):
        calls.append((time.monotonic(), req.ref))
        if len(calls) <= failures:
            error = "Internal merger error, not caused by the change: OSError: disk on fire."
            return MergeResult(req.item_uuid, ref=req.ref, error=error, internal=True)
        return real(req)

    monkeypatch.setattr(merger, "merge", merge)
    return calls


def test_merger_internal_error_is_retried(env, monkeypatch):
    env.start(hold=False)
    a = env.change("a")
    env.checked(a)
    calls = _failing_merger(env, monkeypatch, failures=1)
    env.local.approve(a)
    wait_for_votes(env.zk, a, 2, timeout=30)
    env.settle()
    assert env.gate_votes(a) == [1]
    (message,) = env.vote_messages(a)
    assert "MERGE_CONFLICT" not in message and "merged" in message
    assert len(calls) == 2 and calls[0][1] == calls[1][1]  # the same build set, again
    assert env.branch_log() == ["a", "Initial commit"]


def test_merger_failing_every_time_reports_without_a_vote(env, monkeypatch):
    env.start(hold=False)
    a = env.change("a")
    env.checked(a)
    calls = _failing_merger(env, monkeypatch, failures=99)
    env.local.approve(a)
    wait_for_votes(env.zk, a, 2, timeout=30)
    env.settle()
    assert env.gate_votes(a) == [None]
    (message,) = env.vote_messages(a)
    assert "MERGE_CONFLICT" not in message
    assert "The merger failed 3 times on this change" in message
    assert len(calls) == 3
    assert env.local.get_change_data(a)["status"] == "NEW"
    assert env.launcher.builds == []
    assert pipeline_status(env.zk, "gate") == []


def test_merger_internal_error_is_retried_a_little_later(env, monkeypatch):
    env.start(hold=False)
    a = env.change("a")
    env.checked(a)
    calls = _failing_merger(env, monkeypatch, failures=1)
    env.local.approve(a)
    wait_for_votes(env.zk, a, 2, timeout=30)
    env.settle()
    assert calls[1][0] - calls[0][0] >= 1.5  # _merge_failed's 2 s backoff


# 7. A report after a crash is not made twice --------------------------------------


@pytest.mark.parametrize("in_txn", [True, False], ids=["vote-in-transaction", "report-record"])
@pytest.mark.parametrize("crash", ["after-merge", "before-report", "after-report"])
def test_report_interrupted_by_a_crash_is_made_once(env, monkeypatch, crash, in_txn):
    """The scheduler stops for good at `crash` (its thread never returns), as a
    killed one would; a new one on the same ZooKeeper finishes the item. The
    local inbox votes in the transaction that removes the item; a review
    system outside ZooKeeper (played by the inbox with that turned off) goes
    through the report record and has_report()."""
    env.configure("gate.yaml")
    zk1 = ZooKeeper(env.zk_hosts)
    zk1.connect()
    sched1 = Scheduler(env.cfg, zk1)
    sched1.start()
    env.start_launcher()
    frozen = threading.Event()

    def freeze():
        frozen.set()
        threading.Event().wait()  # this scheduler never takes another step

    conn = sched1.connections["local"]
    monkeypatch.setattr(conn, "reports_in_transaction", in_txn)
    real_merge, real_report = conn.merge_many, conn.report
    real_report_ops = conn.report_ops

    def merge_many(changes, shas, merger):
        errors = real_merge(changes, shas, merger)
        if crash == "after-merge":
            freeze()
        return errors

    def report(change, report):
        if report.pipeline == "gate" and crash == "before-report":
            freeze()
        real_report(change, report)
        if report.pipeline == "gate" and crash == "after-report":
            freeze()

    def report_ops(change, report, txn):
        if report.pipeline == "gate" and crash == "before-report":
            freeze()
        real_report_ops(change, report, txn)
        if report.pipeline == "gate" and crash == "after-report":
            freeze()  # before the transaction is committed

    monkeypatch.setattr(conn, "merge_many", merge_many)
    monkeypatch.setattr(conn, "report", report)
    monkeypatch.setattr(conn, "report_ops", report_ops)
    a = env.change("a")
    env.checked(a)
    env.local.approve(a)
    assert frozen.wait(30), "the scheduler never reached the crash point"
    (item,) = pipeline_status(env.zk, "gate")
    assert (env.state.get_report(item["uuid"]) is not None) == (not in_txn)
    env.launcher.stop()
    sched1.stop()
    zk1.disconnect()
    assert env.gate_votes(a) == ([1] if crash == "after-report" and not in_txn else [])

    env.sched = Scheduler(env.cfg, env.zk)
    env.sched.start()
    env.start_launcher()
    wait_for_votes(env.zk, a, 2, timeout=30)
    wait_until(lambda: not pipeline_status(env.zk, "gate"), what="the item to be removed")
    env.settle()
    assert env.gate_votes(a) == [1]
    assert env.state.report_uuids() == []
    assert env.branch_log() == ["a", "Initial commit"]
    assert env.local.get_change_data(a)["status"] == "MERGED"
    assert "Build succeeded; merged." in env.vote_messages(a)[0]
    assert env.launcher.builds == []


def test_check_items_finishing_together_are_voted_even_if_one_report_raises(env, monkeypatch):
    """Items of independent queues that finish in one pass are reported
    together (one history write, one transaction); one whose report raises
    is then reported on its own, with no vote and one sentence, and the
    others still get theirs."""
    env.start("demo.yaml")
    a, b, c = (env.change(n) for n in "abc")
    env.launcher.wait_for_builds(6, held=True)  # lint and build; boot waits for build
    conn = env.sched.connections["local"]
    real = conn.report_ops

    def report_ops(change, report, txn):
        if change.number == b and report.verified is not None:
            raise RuntimeError("the report of change 2 is broken")
        return real(change, report, txn)

    monkeypatch.setattr(conn, "report_ops", report_ops)
    env.launcher.hold = False
    env.launcher.release()
    for number in (a, b, c):
        wait_for_votes(env.zk, number, 1)
    env.settle()
    assert votes_in(env.zk, a, "check") == [1] and votes_in(env.zk, c, "check") == [1]
    assert votes_in(env.zk, b, "check") == [None]
    assert (
        "zuul-lite hit an internal error on this change "
        "(RuntimeError: the report of change 2 is broken)." in env.vote_messages(b, "check")[0]
    )
    assert pipeline_status(env.zk, "check") == []


def test_a_change_written_after_it_was_read_ahead_is_voted_on_its_new_state(env):
    """Reports read their changes ahead in one round trip (`preloaded`); a
    change written after that read (a comment) makes the vote's versioned
    write fail, and the retry reads it again: both the comment and the vote
    are kept, and nothing read ahead outlives the block."""
    env.configure()
    a, b = env.change("a"), env.change("b")
    change = env.local.get_change(a)
    report = Report(id="r1", pipeline="check", message="ok", verified=1)
    cli = LocalConnection("local", {"driver": "local"}, env.state, env.cfg.state_dir)
    with env.local.preloaded([a, b]):
        cli.comment(a, "looks good")  # as `zuul-lite comment` would, from another process
        txn = env.state.transaction()
        env.local.report_ops(change, report, txn)
        with pytest.raises(BadVersionError):
            txn.commit()
        txn = env.state.transaction()
        env.local.report_ops(change, report, txn)
        txn.commit()
    data = env.local.get_change_data(a)
    assert [c["message"] for c in data["comments"]] == ["looks good"]
    assert [v["value"] for v in data["votes"]] == [1]
    cli.comment(b, "after the block")  # b was read ahead but not used: not served stale
    assert [c["message"] for c in env.local.get_change_data(b)["comments"]] == ["after the block"]


def test_two_patchsets_of_a_change_finishing_together_both_get_their_vote(env):
    """An operator enqueued patchset 1 again beside patchset 2, and both
    finish in one pass: both votes go to the one change, whose write is
    versioned, so they are made in two transactions (in one, the second
    write would refuse the first forever)."""
    env.start("flaky.yaml")
    a = env.change("a")
    out = make_series(env.src, env.tmp / "series-a2", [("a.txt", "a2", "a: v2")])
    env.local.submit(out, "demo", change=a)  # patchset 1 is superseded: dequeued
    env.settle()
    env.state.put_management_event(
        ManagementEvent(type="enqueue", pipeline="check", change=a, patchset=1).to_dict()
    )
    env.settle()
    assert len(pipeline_status(env.zk, "check")) == 2
    # Every result is stored before the scheduler reads any: one wake-up, one pass.
    blocked = threading.Event()
    env.sched.post_callback(lambda: blocked.wait(60))
    env.launcher.hold = False
    env.launcher.release()
    blocked.set()
    wait_for_votes(env.zk, a, 2)
    env.settle()
    assert sorted(v["patchset"] for v in env.local.get_change_data(a)["votes"]) == [1, 2]
    assert pipeline_status(env.zk, "check") == []
