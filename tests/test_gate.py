"""The gate (dependent pipeline) in the style of Zuul's gate tests: hold the
builds, release them one at a time, and check the exact combination of
changes each build was tested on. Real ZooKeeper, gear, git and merger; the
stand-in launcher answers builds (tests/harness.py)."""

from __future__ import annotations

import logging
import threading

import pytest

from nodepool_lite.zk import ZooKeeper
from tests.harness import (
    StandInLauncher,
    make_project,
    make_series,
    settle,
    wait_for_votes,
    wait_until,
    write_config,
)
from zuul_lite import config as zconfig
from zuul_lite.connections.local import LocalConnection
from zuul_lite.exceptions import InboxError
from zuul_lite.git import git
from zuul_lite.model import ManagementEvent
from zuul_lite.scheduler import Scheduler
from zuul_lite.state import ZuulState


@pytest.fixture
def gate(tmp_path, zk_hosts):
    cfg = zconfig.load(write_config(tmp_path, zk_hosts, layout="gate.yaml"))
    zk = ZooKeeper(zk_hosts)
    zk.connect()
    src = make_project(tmp_path)
    local = LocalConnection("local", {"driver": "local"}, ZuulState(zk), cfg.state_dir)
    local.import_project("demo", src)
    sched = Scheduler(cfg, zk)
    sched.start()
    launcher = StandInLauncher(zk, sched.gearman_port)
    launcher.hold = True
    launcher.start()
    env = Gate(cfg, zk, local, src, tmp_path, sched, launcher)
    yield env
    launcher.stop()
    sched.stop()
    zk.disconnect()


class Gate:
    def __init__(self, cfg, zk, local, src, tmp, sched, launcher) -> None:
        self.cfg, self.zk, self.local, self.src = cfg, zk, local, src
        self.tmp, self.sched, self.launcher = tmp, sched, launcher

    def change(self, name: str, content: str | None = None, path: str | None = None) -> int:
        """A one-patch change adding its own file (so changes do not conflict)."""
        out = make_series(
            self.src,
            self.tmp / f"series-{name}",
            [(path or f"{name}.txt", content or f"{name}\n", f"{name}: add")],
        )
        number, _ = self.local.submit(out, "demo")
        return number

    def approve(self, *numbers: int) -> None:
        for n in numbers:
            self.local.approve(n)
        settle(self.sched, self.launcher)

    def running(self) -> list[tuple[str, str]]:
        settle(self.sched, self.launcher)
        return sorted(self.launcher.held_builds())

    def release(self, pattern: str = ".*", change: int | None = None) -> None:
        self.launcher.release(pattern, change)
        settle(self.sched, self.launcher)

    def history(self) -> list[tuple[str, str, str]]:
        return sorted((h["name"], h["result"], h["changes"]) for h in self.launcher.history)

    def branch_log(self) -> list[str]:
        repo = self.local.repo_path("demo")
        return git(repo, "log", "--format=%s", "master").split("\n")[:-1]

    def gate_votes(self, number: int) -> list[int | None]:
        votes = self.local.get_change_data(number)["votes"]
        return [v["value"] for v in votes if v["pipeline"] == "gate"]


# The builds of changes 1, 2 and 3 approved in that order, each on the ones ahead.
ABC_BUILDS = [
    (job, changes) for job in ("build", "lint") for changes in ("1,1", "1,1 2,1", "1,1 2,1 3,1")
]


def test_all_pass_merge_in_order(gate: Gate) -> None:
    a, b, c = (gate.change(n) for n in "abc")
    gate.approve(a, b, c)
    assert gate.running() == ABC_BUILDS
    # C finishes first but merges only after A and B.
    gate.release(change=c)
    assert gate.branch_log()[0] == "Initial commit"
    gate.release(change=b)
    assert gate.branch_log()[0] == "Initial commit"
    gate.release(change=a)
    wait_for_votes(gate.zk, c, count=2)
    assert gate.branch_log() == ["c: add", "b: add", "a: add", "Initial commit"], _debug_votes(
        gate, a, b, c
    )
    for n in (a, b, c):
        assert gate.gate_votes(n) == [1]
        assert gate.local.get_change_data(n)["status"] == "MERGED"
    assert "merged" in gate.local.get_change_data(c)["votes"][-1]["message"]
    assert gate.sched.state.read_status()["pipelines"][1]["items"] == []


def test_first_fails_others_rebased(gate: Gate) -> None:
    a, b, c = (gate.change(n) for n in "abc")
    gate.launcher.results = {f"build:{a}": "FAILURE"}
    gate.approve(a, b, c)
    gate.release("build", change=a)  # A fails: B and C restart without it
    assert gate.running() == [
        ("build", "2,1"),
        ("build", "2,1 3,1"),
        ("lint", "1,1"),
        ("lint", "2,1"),
        ("lint", "2,1 3,1"),
    ]
    gate.launcher.hold = False
    gate.release()
    wait_for_votes(gate.zk, c, count=2)
    assert gate.gate_votes(a) == [-1]
    assert gate.gate_votes(b) == [1] and gate.gate_votes(c) == [1]
    assert gate.branch_log() == ["c: add", "b: add", "Initial commit"]
    aborted = [h for h in gate.history() if h[1] == "ABORTED"]
    assert sorted(h[2] for h in aborted) == ["1,1 2,1", "1,1 2,1", "1,1 2,1 3,1", "1,1 2,1 3,1"]
    settle(gate.sched, gate.launcher)
    assert gate.sched.state.build_uuids() == []  # results of stopped builds cleaned up


def test_middle_fails(gate: Gate) -> None:
    a, b, c = (gate.change(n) for n in "abc")
    gate.launcher.results = {f"lint:{b}": "FAILURE"}
    gate.approve(a, b, c)
    gate.release("lint", change=b)
    assert ("build", "1,1 3,1") in gate.running()
    assert ("build", "1,1 2,1 3,1") not in gate.running()
    gate.launcher.hold = False
    gate.release()
    wait_for_votes(gate.zk, c, count=2)
    votes = [gate.gate_votes(n) for n in (a, b, c)]
    assert votes == [[1], [-1], [1]], _debug_votes(gate, a, b, c)
    assert gate.branch_log() == ["c: add", "a: add", "Initial commit"]
    assert "Tested on top of 1,1." in gate.local.get_change_data(c)["votes"][-1]["message"]


def test_merge_conflict_mid_queue(gate: Gate) -> None:
    a = gate.change("a", "from a\n", path="shared.txt")
    b = gate.change("b", "from b\n", path="shared.txt")  # conflicts with a
    c = gate.change("c")
    gate.approve(a, b, c)
    assert gate.gate_votes(b) == [-1]
    message = gate.local.get_change_data(b)["votes"][-1]["message"]
    assert "MERGE_CONFLICT" in message and "with change 1,1 applied" in message
    assert gate.running() == [
        ("build", "1,1"),
        ("build", "1,1 3,1"),
        ("lint", "1,1"),
        ("lint", "1,1 3,1"),
    ]
    gate.launcher.hold = False
    gate.release()
    wait_for_votes(gate.zk, c, count=2)
    assert gate.branch_log() == ["c: add", "a: add", "Initial commit"]


def test_approved_again_while_queued(gate: Gate) -> None:
    a = gate.change("a")
    gate.approve(a)
    before = gate.running()
    gate.approve(a)
    assert gate.running() == before
    items = gate.sched.state.read_status()["pipelines"][1]["items"]
    assert len(items) == 1


def test_operator_dequeue(gate: Gate) -> None:
    a, b = gate.change("a"), gate.change("b")
    gate.approve(a, b)
    gate.sched.state.put_management_event(
        ManagementEvent(type="dequeue", pipeline="gate", change=a).to_dict()
    )
    assert gate.running() == [("build", "2,1"), ("lint", "2,1")]
    assert gate.gate_votes(a) == []
    gate.launcher.hold = False
    gate.release()
    wait_for_votes(gate.zk, b, count=2)
    assert gate.branch_log() == ["b: add", "Initial commit"]


def test_early_failure_resets_before_the_build_ends(gate: Gate) -> None:
    a, b = gate.change("a"), gate.change("b")
    gate.approve(a, b)
    gate.launcher.early_fail("build")  # every held build says it will fail...
    running = gate.running()
    # ...so B is re-based onto the branch head while A's build still runs.
    assert ("build", "1,1") in running and ("build", "2,1") in running
    assert ("build", "1,1 2,1") not in running


def test_bad_approvals(gate: Gate) -> None:
    with pytest.raises(InboxError, match="There is no change 99"):
        gate.local.approve(99)
    a = gate.change("a")
    gate.local.abandon(a)
    with pytest.raises(InboxError, match="abandoned: only an open change can be approved"):
        gate.local.approve(a)
    assert gate.sched.state.read_status()["pipelines"][1]["items"] == []


def test_window_limits_active_items(gate: Gate) -> None:
    gate.sched.managers["gate"].pipeline.window = 2
    for queue in gate.sched.managers["gate"].pipeline.queues:
        queue.window = 2
    numbers = [gate.change(n) for n in "abcd"]
    gate.approve(*numbers)
    assert {c for _, c in gate.running()} == {"1,1", "1,1 2,1"}


def _debug_votes(gate: Gate, *numbers: int) -> str:
    return "\n".join(
        f"{n}: {v['pipeline']} {v['value']} {v['message']}"
        for n in numbers
        for v in gate.local.get_change_data(n)["votes"]
    )


def test_head_fails_last_so_all_behind_restart(gate: Gate) -> None:
    """The failing item is at the head when its last build ends: every item
    behind it, not only the next one, restarts without it."""
    a, b, c, d = (gate.change(n) for n in "abcd")
    gate.launcher.results = {f"build:{a}": "FAILURE"}
    gate.approve(a, b, c, d)
    gate.release("lint", change=a)
    gate.release("build", change=a)
    assert gate.gate_votes(a) == [-1]
    assert sorted(c for _, c in gate.running()) == [
        "2,1",
        "2,1",
        "2,1 3,1",
        "2,1 3,1",
        "2,1 3,1 4,1",
        "2,1 3,1 4,1",
    ]
    gate.launcher.hold = False
    gate.release()
    wait_for_votes(gate.zk, d, count=2)
    assert [gate.gate_votes(n) for n in (b, c, d)] == [[1], [1], [1]]
    assert gate.branch_log() == ["d: add", "c: add", "b: add", "Initial commit"]


def test_window_shrinks_on_a_failure(gate: Gate) -> None:
    """Zuul's window: halved (down to its floor) when an item fails at the head."""
    pipeline = gate.sched.managers["gate"].pipeline
    pipeline.window, pipeline.window_floor = 4, 2
    numbers = [gate.change(n) for n in "abcdef"]
    gate.launcher.results = {f"build:{numbers[0]}": "FAILURE"}
    gate.approve(*numbers)
    assert {c for _, c in gate.running()} == {"1,1", "1,1 2,1", "1,1 2,1 3,1", "1,1 2,1 3,1 4,1"}
    gate.release(change=numbers[0])
    assert gate.gate_votes(numbers[0]) == [-1]
    assert {c for _, c in gate.running()} == {"2,1", "2,1 3,1"}
    assert gate.sched.state.read_status()["pipelines"][1]["queues"][0]["window"] == 2


def test_merges_run_off_the_scheduler_thread(gate: Gate) -> None:
    """A gate merge (the push) is slow next to everything else the scheduler
    does: while it runs, builds of other changes still go out, an operator
    cannot dequeue a change whose commits are being pushed, and the items
    that passed behind the head land with the same single push."""
    merger = gate.sched.merger.merger
    push, pushing, go = merger.push, threading.Event(), threading.Event()
    pushes = []

    def held_push(*args, **kwargs):
        pushing.set()
        assert go.wait(30)
        pushes.append(args[1])
        return push(*args, **kwargs)

    merger.push = held_push
    a, b = gate.change("a"), gate.change("b")
    gate.approve(a, b)
    gate.release(change=b)
    gate.launcher.release(change=a)
    assert pushing.wait(30)
    c = gate.change("c")
    gate.local.approve(c)
    gate.sched.state.put_management_event(
        ManagementEvent(type="dequeue", pipeline="gate", change=a).to_dict()
    )
    settle(gate.sched, gate.launcher, ignore=("gate merges",))
    assert sorted(gate.launcher.held_builds()) == [
        ("build", "1,1 2,1 3,1"),
        ("lint", "1,1 2,1 3,1"),
    ]
    assert gate.gate_votes(a) == []
    go.set()
    wait_for_votes(gate.zk, b, count=2)
    assert gate.branch_log() == ["b: add", "a: add", "Initial commit"]
    assert gate.gate_votes(a) == [1] and gate.gate_votes(b) == [1]
    assert set(pushes) == {pushes[0]}  # one state for both: b on a
    gate.launcher.hold = False
    gate.release()
    wait_for_votes(gate.zk, c, count=2)
    assert gate.branch_log()[0] == "c: add"


def test_a_run_that_passed_lands_with_one_push_and_one_transaction(gate: Gate, caplog) -> None:
    """The items that passed behind the head when it merges land with it:
    one push of the last one's state, their votes, MERGED and removal in one
    ZooKeeper transaction, and the branch announced moved once."""
    caplog.set_level(logging.DEBUG, logger="zuul_lite.scheduler")
    a, b, c = (gate.change(n) for n in "abc")
    gate.approve(a, b, c)
    merger, manager = gate.sched.merger.merger, gate.sched.managers["gate"]
    push, remove_items = merger.push, manager.remove_items
    pushes, removed = [], []

    def counted_push(*args, **kwargs):
        pushes.append(args[1])
        return push(*args, **kwargs)

    def counted_remove(items, *args, **kwargs):
        removed.append([i.change.number for i in items])
        return remove_items(items, *args, **kwargs)

    merger.push, manager.remove_items = counted_push, counted_remove
    gate.release(change=c)
    gate.release(change=b)
    gate.release(change=a)
    wait_for_votes(gate.zk, c, count=2)
    settle(gate.sched, gate.launcher)
    head = git(gate.local.repo_path("demo"), "rev-parse", "master").strip()
    assert pushes == [head]
    assert removed == [[a, b, c]]
    for n in (a, b, c):
        data = gate.local.get_change_data(n)
        assert (data["status"], data["merged_sha"]) == ("MERGED", head)
        assert gate.gate_votes(n) == [1]
    moved = [
        r.getMessage() for r in caplog.records if "ref-updated on refs/heads" in r.getMessage()
    ]
    # The fixture's import of the initial commit may be announced meanwhile.
    repo = gate.local.repo_path("demo")
    landed = [git(repo, "rev-parse", f"{head}~{n}").strip()[:12] for n in (0, 1, 2)]
    announced = [sha for sha in landed if any(sha in m for m in moved)]
    assert announced == [head[:12]], moved


def test_a_push_that_fails_fails_the_head_and_retests_the_run(gate: Gate) -> None:
    """A run whose push is refused: the head is reported with the reason,
    the items behind it, not merged, are tested again without it and land."""
    a, b = gate.change("a"), gate.change("b")
    gate.approve(a, b)
    merger = gate.sched.merger.merger
    push = merger.push
    refusals = ["Not merged: the review system said no."]

    def refused_once(*args, **kwargs):
        return refusals.pop() if refusals else push(*args, **kwargs)

    merger.push = refused_once
    gate.release()
    assert gate.gate_votes(a) == [-1]
    assert "the review system said no" in gate.local.get_change_data(a)["votes"][-1]["message"]
    assert gate.local.get_change_data(b)["status"] == "NEW"
    assert gate.running() == [("build", "2,1"), ("lint", "2,1")]
    gate.release()
    wait_for_votes(gate.zk, b, count=2)
    assert gate.gate_votes(b) == [1]
    assert gate.branch_log() == ["b: add", "Initial commit"]


def test_a_change_closed_as_its_run_lands_stays_off_the_branch(gate: Gate) -> None:
    """b is abandoned after a, b and c passed but before their one push: a
    lands alone (its own state, not the run's), b and c do not; c is tested
    again without b and lands (its merge is of its new build set, not of the
    state it passed in behind b)."""
    a, b, c = (gate.change(n) for n in "abc")
    gate.approve(a, b, c)
    conn = gate.sched.connections["local"]
    merge_many, pushes = conn.merge_many, []
    push = gate.sched.merger.merger.push

    def abandon_first(changes, shas, merger):
        if b in [ch.number for ch in changes] and not pushes:
            gate.local.abandon(b)
        return merge_many(changes, shas, merger)

    def counted_push(*args, **kwargs):
        pushes.append(args[1])
        return push(*args, **kwargs)

    conn.merge_many, gate.sched.merger.merger.push = abandon_first, counted_push
    gate.release(change=c)
    gate.release(change=b)
    gate.release(change=a)
    assert gate.branch_log() == ["a: add", "Initial commit"]
    assert gate.local.get_change_data(a)["merged_sha"] == pushes[0]
    assert gate.local.get_change_data(b)["status"] == "ABANDONED"
    assert gate.running() == [("build", "3,1"), ("lint", "3,1")]  # on the branch, with a
    gate.release()
    wait_for_votes(gate.zk, c, count=2)
    assert gate.branch_log() == ["c: add", "a: add", "Initial commit"]


def test_events_of_one_wake_up_are_stored_together_in_order(gate: Gate, monkeypatch) -> None:
    """Trigger events queued while the loop is busy are planned one behind
    the other and stored in one transaction; a malformed one among them is
    dropped alone."""
    a, b, c = (gate.change(n) for n in "abc")
    settle(gate.sched, gate.launcher)
    sched = gate.sched
    batches = []
    commit = sched._commit_triggers

    def recorded(batch):
        if batch.events:
            batches.append([event.change for _, _, event, _ in batch.events])
        commit(batch)

    monkeypatch.setattr(sched, "_commit_triggers", recorded)
    busy, go = threading.Event(), threading.Event()
    sched.post_callback(lambda: (busy.set(), go.wait(30)))
    assert busy.wait(30)
    gate.local.approve(a)
    sched.state.put_trigger_event({"hello": "world"})
    gate.local.approve(b)
    gate.local.approve(c)
    wait_until(
        lambda: len(sched._queued.get(id(sched._triggers), [])) == 4,
        what="the scheduler's watch to see the four events",
    )
    go.set()
    assert gate.running() == ABC_BUILDS
    assert batches == [[a, b, c]]
    assert sched.state.trigger_events() == []
