"""The Gerrit connection against a stand-in Gerrit that speaks Gerrit's ssh
interface (tests/fake_gerrit.py), through a real scheduler with real
ZooKeeper, gear, git and merger; the stand-in launcher answers builds."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import yaml

from nodepool_lite.zk import ZooKeeper
from tests.fake_gerrit import FakeGerrit
from tests.harness import (
    StandInLauncher,
    make_project,
    pipeline_status,
    run_git,
    settle,
    wait_until,
    write_config,
)
from zuul_lite import config as zconfig
from zuul_lite.connections import Report
from zuul_lite.connections.gerrit import GerritConnection
from zuul_lite.exceptions import ConfigError
from zuul_lite.scheduler import Scheduler


class Env:
    def __init__(self, tmp_path, zk_hosts, rest: bool = False) -> None:
        self.tmp = tmp_path
        self.zk_hosts = zk_hosts
        self.fake = FakeGerrit(tmp_path / "gerrit")
        self.src = make_project(tmp_path)
        self.fake.add_project("demo", self.src)
        path = write_config(tmp_path, zk_hosts, layout="gerrit.yaml")
        data = yaml.safe_load(path.read_text())
        extra = {"projects": ["demo"]}
        if rest:
            extra.update({"rest-url": self.fake.serve_rest("secret"), "http-password": "secret"})
        data["connections"] = {"gerrit": self.fake.connection_config(**extra)}
        path.write_text(yaml.safe_dump(data))
        self.cfg = zconfig.load(path)
        self.zk = ZooKeeper(zk_hosts)
        self.zk.connect()
        self.sched: Scheduler | None = None
        self.launcher: StandInLauncher | None = None

    def start(self, zk: ZooKeeper | None = None) -> None:
        self.sched = Scheduler(self.cfg, zk or self.zk)
        self.sched.start()
        self.launcher = StandInLauncher(self.zk, self.sched.gearman_port)
        self.launcher.start()
        self.fake.wait_for_streams()

    def stop(self) -> None:
        if self.launcher is not None:
            self.launcher.stop()
        if self.sched is not None:
            self.sched.stop()

    def upload(self, name: str, emit: bool = True) -> int:
        """A one-commit change adding its own file, uploaded to the fake Gerrit."""
        (self.src / f"{name}.txt").write_text(f"{name}\n")
        run_git(self.src, "add", f"{name}.txt")
        run_git(self.src, "commit", "-qs", "-m", f"{name}: add")
        sha = run_git(self.src, "rev-parse", "HEAD").strip()
        run_git(self.src, "reset", "-q", "--hard", "HEAD~1")
        number, _ = self.fake.upload("demo", self.src, sha, emit=emit)
        return number

    def votes(self, number: int, count: int, timeout: float = 30) -> list[dict]:
        """The Verified votes on `number`, once there are `count` of them."""

        def voted() -> list[dict]:
            return [r for r in self.fake.reviews_of(number) if "Verified" in r["labels"]]

        self.fake.wait_for(lambda: len(voted()) >= count, timeout, f"{count} vote(s) on {number}")
        return voted()


@pytest.fixture
def env(request, tmp_path, zk_hosts):
    env = Env(tmp_path, zk_hosts, rest=getattr(request, "param", False))
    yield env
    env.stop()
    env.fake.stop()
    env.zk.disconnect()


def test_patchset_gets_verified_plus_and_minus_one(env) -> None:
    env.start()
    env.launcher.results = {"build:2": "FAILURE"}
    good, bad = env.upload("good"), env.upload("bad")
    (plus,) = env.votes(good, 1)
    (minus,) = env.votes(bad, 1)
    assert plus["labels"] == {"Verified": 1} and plus["project"] == "demo"
    assert "zuul-lite check pipeline, change 1,1: Build succeeded." in plus["message"]
    assert minus["labels"] == {"Verified": -1}
    assert "Build failed" in minus["message"] and "- build " in minus["message"]
    assert {(b["job"], b["changes"]) for b in env.launcher.builds} == {
        ("lint", "1,1"),
        ("build", "1,1"),
        ("lint", "2,1"),
        ("build", "2,1"),
    }
    # The merger got each patchset over git from Gerrit's refs/changes.
    assert any(c.startswith("git-upload-pack") for c in env.fake.commands)


def test_recheck_comment_runs_check_again(env) -> None:
    env.start()
    number = env.upload("a")
    env.votes(number, 1)
    env.fake.comment(number, "recheck")
    assert [v["labels"] for v in env.votes(number, 2)] == [{"Verified": 1}] * 2


@pytest.mark.parametrize("env", [False, True], ids=["ssh", "rest"], indirect=True)
def test_approval_gates_and_submits(env) -> None:
    env.start()
    number = env.upload("a")
    env.votes(number, 1)
    env.fake.approve(number)
    check, gate = env.votes(number, 2)
    assert "zuul-lite gate pipeline, change 1,1: Build succeeded; merged." in gate["message"]
    submits = [r for r in env.fake.reviews_of(number) if r["submit"]]
    assert len(submits) == 1
    rest = "rest-url" in env.cfg.connections["gerrit"]
    assert [r.get("rest", False) for r in env.fake.reviews_of(number)] == [rest] * 3
    assert env.fake.changes[number].status == "MERGED"
    log = run_git(env.fake.repo("demo"), "log", "--format=%s", "master").split("\n")[:-1]
    assert log == ["a: add", "Initial commit"]
    # Gerrit's ref-updated runs post on the new branch head, from the mirror.
    head = env.fake.branch_head("demo")
    wait_until(lambda: any(b["pipeline"] == "post" for b in env.launcher.builds), what="post")
    (post,) = [b for b in env.launcher.builds if b["pipeline"] == "post"]
    assert (post["ref"], post["newrev"], post["change"]) == ("refs/heads/master", head, 0)
    settle(env.sched, env.launcher)
    assert not pipeline_status(env.zk, "gate")


def test_stacked_changes_are_tested_together_and_merged_in_order(env, caplog) -> None:
    """B's git parent is change A: check tests B on top of A; B approved
    first waits for A, and enters the gate behind it when A is approved."""
    env.start()
    shas = []
    for name in "ab":
        (env.src / f"{name}.txt").write_text(f"{name}\n")
        run_git(env.src, "add", f"{name}.txt")
        run_git(env.src, "commit", "-qm", f"{name}: add")
        shas.append(run_git(env.src, "rev-parse", "HEAD").strip())
    run_git(env.src, "reset", "-q", "--hard", "HEAD~2")
    a, _ = env.fake.upload("demo", env.src, shas[0])
    env.votes(a, 1)
    b, _ = env.fake.upload("demo", env.src, shas[1])
    env.votes(b, 1)
    assert {bd["changes"] for bd in env.launcher.builds} == {"1,1", "1,1 2,1"}
    env.fake.approve(b)
    wait_until(lambda: "Change 2 waits for change 1" in caplog.text, what="B to wait")
    env.fake.approve(a)
    env.fake.wait_for(
        lambda: all(env.fake.changes[n].status == "MERGED" for n in (a, b)), what="both merged"
    )
    log = run_git(env.fake.repo("demo"), "log", "--format=%s", "master").split("\n")[:-1]
    assert log == ["b: add", "a: add", "Initial commit"]
    gate = [bd["changes"] for bd in env.launcher.builds if bd["pipeline"] == "gate"]
    assert sorted(set(gate)) == ["1,1", "1,1 2,1"]


def test_bad_stream_lines_are_skipped_and_a_dropped_stream_resyncs(env, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="zuul_lite.connections.gerrit")
    env.start()
    env.fake.send_raw("this is not JSON")
    env.fake.send_raw("[1, 2, 3]")
    env.fake.emit({"type": "topic-changed", "change": {"number": 1}})
    env.fake.emit({"type": "patchset-created", "patchSet": {"number": 1}})
    a = env.upload("a")  # still heard after the garbage
    env.votes(a, 1)
    messages = caplog.text
    assert "Skipped a malformed event line: b'this is not JSON'" in messages
    assert "Skipped an event that is not a JSON object" in messages
    assert "Skipped a Gerrit event of type 'topic-changed'" in messages
    assert "Skipped a patchset-created event without change number" in messages

    env.fake.drop_streams()
    env.fake.page_size = 1  # the resync's query takes a page per change
    b, c = env.upload("b", emit=False), env.upload("c", emit=False)  # while nobody listens
    (vote,) = env.votes(b, 1)
    assert vote["labels"] == {"Verified": 1}
    env.votes(c, 1)
    assert any("--start 1" in cmd for cmd in env.fake.commands)
    assert "Event stream from 127.0.0.1 lost" in caplog.text
    assert "Resync: change 2,1 has no vote of ours" in caplog.text
    settle(env.sched, env.launcher)
    assert len(env.votes(a, 1)) == 1  # a had our vote: not tested again
    assert sorted(b["job"] for b in env.launcher.builds if b["changes"] == "1,1") == [
        "build",
        "lint",
    ]


def test_vote_made_before_a_crash_is_not_made_again(env) -> None:
    """The scheduler stops for good right after `gerrit review` returned,
    before the item's removal is recorded (as a killed one would); a new
    scheduler finds the report record, asks Gerrit, and does not vote again."""
    zk1 = ZooKeeper(env.zk_hosts)
    zk1.connect()
    env.start(zk1)
    frozen = threading.Event()
    conn = env.sched.connections["gerrit"]
    real_report = conn.report

    def report(change, report):
        real_report(change, report)
        frozen.set()
        threading.Event().wait()  # this scheduler never takes another step

    conn.report = report
    number = env.upload("a")
    assert frozen.wait(30), "the scheduler never reported"
    (item,) = pipeline_status(env.zk, "check")
    env.stop()
    zk1.disconnect()
    assert len(env.votes(number, 1)) == 1

    env.start()
    wait_until(lambda: not pipeline_status(env.zk, "check"), what="the item to be removed")
    settle(env.sched, env.launcher)
    assert len(env.votes(number, 1)) == 1
    assert env.sched.state.get_report(item["uuid"]) is None
    assert len(env.launcher.builds) == 0  # nothing was run again


def test_bad_config_names_the_key(tmp_path) -> None:
    config = {"driver": "gerrit", "server": "review.example.org", "user": "zuul", "sshkey": "k"}
    with pytest.raises(ConfigError, match=r"^Connection review: port: .*\.$"):
        GerritConnection("review", {**config, "port": "many"}, None, tmp_path)
    without_user = {k: v for k, v in config.items() if k != "user"}
    with pytest.raises(ConfigError, match=r"^Connection review: user: required key"):
        GerritConnection("review", without_user, None, tmp_path)
    with pytest.raises(ConfigError, match=r"^Connection review: colour: extra keys"):
        GerritConnection("review", {**config, "colour": "red"}, None, tmp_path)


def test_report_whose_answer_is_lost_is_not_made_twice(tmp_path, caplog) -> None:
    """`gerrit review` takes effect but the connection breaks before its
    answer: the retry first asks Gerrit whether the report is there."""
    fake = FakeGerrit(tmp_path / "gerrit")
    src = make_project(tmp_path)
    fake.add_project("demo", src)
    (src / "a.txt").write_text("a\n")
    run_git(src, "add", "a.txt")
    run_git(src, "commit", "-qm", "a: add\n\nDepends-On: I" + "0" * 39 + "2")
    number, _ = fake.upload("demo", src, run_git(src, "rev-parse", "HEAD").strip(), emit=False)
    conn = GerritConnection("gerrit", fake.connection_config(), None, tmp_path / "state")
    try:
        change = conn.get_change(number)
        assert (change.status, change.patchset, change.latest_patchset) == ("NEW", 1, 1)
        assert change.depends_on == ["I" + "0" * 39 + "2"]
        assert conn.find_change(change.depends_on[0]) is None  # no such change yet
        fake.upload("demo", src, run_git(src, "rev-parse", "HEAD").strip(), emit=False)
        assert conn.find_change(change.depends_on[0]).number == 2
        fake.lose_answer.append("review")
        conn.report(change, Report(id="r-1", pipeline="check", message="Build ok.", verified=1))
        assert [r["labels"] for r in fake.reviews] == [{"Verified": 1}]
        assert "retry 1" in caplog.text
        assert conn.has_report(change, Report(id="r-1", pipeline="check", message=""))
        assert not conn.has_report(change, Report(id="r-2", pipeline="check", message=""))
    finally:
        conn.stop()
        fake.stop()


def test_refused_stream_is_retried_with_growing_backoff(tmp_path, caplog) -> None:
    fake = FakeGerrit(tmp_path / "gerrit")
    fake.refuse_streams = "fatal: not permitted: stream events"
    events = []
    conn = GerritConnection(
        "gerrit", fake.connection_config(), None, tmp_path / "state", events.append
    )
    conn.start()
    try:
        fake.wait_for(
            lambda: sum(c == "gerrit stream-events" for c in fake.commands) >= 2,
            what="a second attempt",
        )
        assert not any(c.startswith("gerrit query") for c in fake.commands)  # no resync yet
        fake.refuse_streams = ""
        fake.wait_for_streams()
        fake.wait_for(lambda: any(c.startswith("gerrit query") for c in fake.commands))
    finally:
        conn.stop()
        fake.stop()
    lost = [r.getMessage() for r in caplog.records if "lost" in r.getMessage()]
    assert lost[:2] == [
        "Event stream from 127.0.0.1 lost (gerrit stream-events failed: fatal: not permitted:"
        " stream events); reconnecting in 1.0 s",
        "Event stream from 127.0.0.1 lost (gerrit stream-events failed: fatal: not permitted:"
        " stream events); reconnecting in 2.0 s",
    ]


def test_events_are_held_event_delay_seconds_and_mapped(tmp_path) -> None:
    fake = FakeGerrit(tmp_path / "gerrit")
    posted: list[tuple[float, object]] = []
    arrived = threading.Condition()

    def post(event) -> None:
        with arrived:
            posted.append((time.monotonic(), event))
            arrived.notify_all()

    conn = GerritConnection(
        "gerrit", fake.connection_config(**{"event-delay": 0.5}), None, tmp_path / "s", post
    )
    conn.start()
    try:
        fake.wait_for_streams()
        sent = time.monotonic()
        change = {"project": "demo", "branch": "master", "number": "7"}  # Gerrit < 2.14: a string
        comment = "Patch Set 2:\n\nrecheck"
        fake.emit(
            {
                "type": "comment-added",
                "change": change,
                "patchSet": {"number": 2},
                "comment": comment,
            }
        )
        branches = (("master", "a" * 40), ("stable", "0" * 40), ("refs/tags/v1", "b" * 40))
        for name, newrev in branches:  # a branch (its short name), a deleted one, a tag
            update = {"project": "demo", "refName": name, "oldRev": "0" * 40, "newRev": newrev}
            fake.emit({"type": "ref-updated", "refUpdate": update})
        fake.emit({"type": "change-abandoned", "change": change})
        with arrived:
            assert arrived.wait_for(lambda: len(posted) == 3, 10)
    finally:
        conn.stop()
        fake.stop()
    assert posted[0][0] - sent >= 0.5
    events = [e for _, e in posted]
    assert [(e.type, e.project, e.branch, e.change, e.patchset) for e in events] == [
        ("comment-added", "demo", "master", 7, 2),
        ("ref-updated", "demo", "master", 0, 0),
        ("change-abandoned", "demo", "master", 7, 0),
    ]
    assert events[0].comment == "Patch Set 2:\n\nrecheck"
    assert (events[1].ref, events[1].oldrev, events[1].newrev) == (
        "refs/heads/master",
        "",
        "a" * 40,
    )
