"""The Patchwork connection against a stand-in Patchwork (tests/fake_patchwork.py)
through a real scheduler: real ZooKeeper, gear, git and merger; the stand-in
launcher answers builds (tests/harness.py)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import yaml

from nodepool_lite.zk import ZooKeeper
from nodepool_lite.zkserver import free_port
from tests.fake_patchwork import FakePatchwork
from tests.harness import (
    StandInLauncher,
    make_project,
    make_series,
    run_git,
    settle,
    wait_until,
    write_config,
)
from zuul_lite import config as zconfig
from zuul_lite.connections import make_connection
from zuul_lite.exceptions import ConfigError
from zuul_lite.model import ManagementEvent
from zuul_lite.scheduler import Scheduler
from zuul_lite.state import ZuulState

TOKEN = "maintainer"


class Env:
    """A fake Patchwork, a bare repo for the branch, and a scheduler on them."""

    def __init__(self, tmp: Path, zk_hosts: str, fake: FakePatchwork, token: str) -> None:
        self.tmp, self.fake = tmp, fake
        self.src = make_project(tmp)
        self.repo = tmp / "demo.git"
        run_git(tmp, "clone", "--bare", "-q", str(self.src), str(self.repo))
        path = write_config(tmp, zk_hosts, layout="patchwork.yaml")
        data = yaml.safe_load(path.read_text())
        data["connections"] = {
            "patchwork": {
                "driver": "patchwork",
                "url": fake.api,
                "project": "demo",
                "token": token,
                "poll-interval": 0.05,
                "timeout": 1,
                "git": str(self.repo),
                "gate-state": "under-review",
            }
        }
        path.write_text(yaml.safe_dump(data))
        self.cfg = zconfig.load(path)
        self.zk = ZooKeeper(zk_hosts)
        self.zk.connect()
        self.sched: Scheduler | None = None
        self.launcher: StandInLauncher | None = None
        self.history: list[dict] = []  # builds of launchers stopped before

    def start(self, hold: bool = False, results: dict | None = None) -> None:
        self.sched = Scheduler(self.cfg, self.zk)
        self.sched.start()
        self.launcher = StandInLauncher(self.zk, self.sched.gearman_port, results)
        self.launcher.hold = hold
        self.launcher.start()

    def stop(self) -> None:
        self.history += self.launcher.history
        self.launcher.stop()
        self.sched.stop()
        # A new scheduler in this process takes new ports: the old sockets may linger.
        self.cfg = dataclasses.replace(self.cfg, gearman_port=free_port(), git_port=free_port())

    @property
    def poller(self):
        return self.sched.connections["patchwork"].poller

    def polled(self, rounds: int = 2) -> None:
        """Wait for `rounds` more polls that went through."""
        start = self.poller.rounds
        wait_until(lambda: self.poller.rounds >= start + rounds, what="polls")

    def series(self, name: str, edits: list[tuple[str, str, str]]) -> int:
        out = make_series(self.src, self.tmp / f"series-{name}", edits)
        return self.fake.add_series(f"[PATCH 0/{len(edits)}] {name}", out)

    def wait_checks(self, series: int, expected: dict[str, str], timeout: float = 30) -> None:
        """Until every patch shows `expected` (context -> state of its newest check)."""
        patches = self.fake.series_patches(series)
        try:
            wait_until(
                lambda: all(self.fake.latest_checks(p) == expected for p in patches), timeout
            )
        except AssertionError:
            found = [self.fake.latest_checks(p) for p in patches]
            raise AssertionError(f"series {series}: checks {found}, not {expected}") from None

    def final_checks(self, series: int) -> list[list[tuple[str, str]]]:
        """(context, state) of every check but the pending ones, per patch."""
        return [
            sorted(
                (c["context"], c["state"]) for c in self.fake.checks(p) if c["state"] != "pending"
            )
            for p in self.fake.series_patches(series)
        ]


@pytest.fixture
def fake(request):
    server = FakePatchwork(api_version=getattr(request, "param", "1.2")).start()
    yield server
    server.stop()


@pytest.fixture
def env(tmp_path, zk_hosts, fake):
    env = Env(tmp_path, zk_hosts, fake, TOKEN)
    yield env
    if env.sched is not None:
        env.stop()
    env.zk.disconnect()


TWO = [
    ("hello.c", "int main(void)\n{\n\treturn 1;\n}\n", "hello: return 1"),
    ("README", "demo project\n", "README: say more"),
]


def test_checks_pending_then_results_on_every_patch(env: Env) -> None:
    env.start(hold=True, results={"build": "FAILURE"})
    sid = env.series("two", TWO)
    env.launcher.wait_for_builds(2, held=True)
    env.wait_checks(sid, {"lint": "pending", "build": "pending"})
    pending = env.fake.checks(env.fake.series_patches(sid)[0])
    log_root = env.cfg.log_url.rstrip("/")
    assert all(c["target_url"].startswith(f"{log_root}/{sid}/1/check/") for c in pending)
    env.launcher.release()
    env.wait_checks(sid, {"lint": "success", "build": "fail"})
    for patch in env.fake.series_patches(sid):
        build = [c for c in env.fake.checks(patch) if c["context"] == "build"][-1]
        assert build["target_url"].startswith(f"http://logs/{sid}/1/check/build/")
        assert "FAILURE" in build["description"] and "something broke" in build["description"]
        assert "\n" not in build["description"]
    settle(env.sched, env.launcher)
    assert env.final_checks(sid) == [[("build", "fail"), ("lint", "success")]] * 2


def test_gate_state_merges_series_and_accepts_patches(env: Env) -> None:
    env.start()
    sid = env.series("two", TWO)
    env.wait_checks(sid, {"lint": "success", "build": "success"})
    first, second = env.fake.series_patches(sid)
    env.fake.set_state(first, "under-review")
    env.polled()
    settle(env.sched, env.launcher)
    assert env.sched.state.read_status()["pipelines"][1]["items"] == []  # half approved
    env.fake.set_state(second, "under-review")
    wait_until(
        lambda: {env.fake.state_of(p) for p in (first, second)} == {"accepted"},
        what="patches accepted",
    )
    log = run_git(env.repo, "log", "--format=%s", "master").splitlines()
    assert log == ["README: say more", "hello: return 1", "Initial commit"]
    settle(env.sched, env.launcher)
    gate = sorted(h["name"] for h in env.launcher.history if h["changes"] == f"{sid},1")
    assert gate == ["build", "build", "lint", "lint"]  # check, then gate
    assert (
        env.final_checks(sid)
        == [[("build", "success"), ("build", "success"), ("lint", "success"), ("lint", "success")]]
        * 2
    )


def test_restart_resumes_from_cursor(env: Env) -> None:
    env.start()
    a = env.series("a", [("a.txt", "a\n", "a: add")])
    env.wait_checks(a, {"lint": "success", "build": "success"})
    settle(env.sched, env.launcher)
    env.stop()
    # While no scheduler runs: b arrives, and c too, whose events Patchwork
    # prunes before the scheduler is back (the resync finds it).
    b = env.series("b", [("b.txt", "b\n", "b: add")])
    c = env.series("c", [("c.txt", "c\n", "c: add")])
    env.fake.events = [e for e in env.fake.events if e.get("series") != c]
    env.start()
    for series in (b, c):
        env.wait_checks(series, {"lint": "success", "build": "success"})
    env.polled()
    settle(env.sched, env.launcher)
    env.history += env.launcher.history
    runs = sorted((h["changes"], h["name"]) for h in env.history)
    assert runs == [(f"{s},1", job) for s in (a, b, c) for job in ("build", "lint")]
    for series in (a, b, c):
        assert env.final_checks(series) == [[("build", "success"), ("lint", "success")]]
    cursor = ZuulState(env.zk).get_cursor("patchwork")["categories"]["series-completed"]
    completed = [e for e in env.fake.events if e["category"] == "series-completed"]
    assert completed[-1]["id"] in cursor["ids"]


def test_errors_are_logged_and_retried(env: Env, caplog) -> None:
    caplog.set_level(logging.INFO, logger="zuul_lite.connections.patchwork")
    env.start()
    env.polled(1)
    env.fake.fail("/events/", 500, 1)
    env.fake.fail("/events/", "timeout", 1)
    env.fake.fail("/events/", "garbage", 1)
    sid = env.series("one", [("one.txt", "1\n", "one: add")])
    env.fake.fail(r"/patches/\d+/checks/", 503, 2)  # the first report attempts
    env.wait_checks(sid, {"lint": "success", "build": "success"})
    text = caplog.text
    assert "failed with HTTP 500" in text
    assert "timed out after 1s" in text
    assert "returned malformed JSON" in text
    assert "Polling Patchwork works again" in text
    settle(env.sched, env.launcher)
    assert env.final_checks(sid) == [[("build", "success"), ("lint", "success")]]


@pytest.mark.parametrize("fake", ["1.3"], indirect=True)
def test_recheck_comment_on_a_patch_or_the_cover_letter_runs_check_again(env: Env) -> None:
    env.start()
    out = make_series(env.src, env.tmp / "series-a", TWO)
    sid = env.fake.add_series("[PATCH 0/2] two", out, cover="Two small things.\n")
    env.wait_checks(sid, {"lint": "success", "build": "success"})
    first, _ = env.fake.series_patches(sid)
    env.fake.add_comment("Looks odd to me.\n\nrecheck\n", patch=first)
    wait_until(lambda: len(env.launcher.history) == 4, what="builds of the recheck")
    env.fake.add_comment("Thanks, applied? No: recheck please", cover=sid)  # not a recheck line
    env.fake.add_comment("recheck", cover=sid)
    wait_until(lambda: len(env.launcher.history) == 6, what="builds of the second recheck")
    env.polled()
    settle(env.sched, env.launcher)
    assert len(env.launcher.history) == 6
    assert {h["changes"] for h in env.launcher.history} == {f"{sid},1"}


def test_dequeued_series_has_no_check_left_pending(env: Env) -> None:
    env.start(hold=True)
    sid = env.series("one", [("one.txt", "1\n", "one: add")])
    env.launcher.wait_for_builds(2, held=True)
    env.wait_checks(sid, {"lint": "pending", "build": "pending"})
    env.sched.state.put_management_event(
        ManagementEvent(type="dequeue", pipeline="check", change=sid).to_dict()
    )
    env.wait_checks(sid, {"lint": "warning", "build": "warning"})
    (check,) = [
        c for c in env.fake.checks(env.fake.series_patches(sid)[0]) if c["state"] == "warning"
    ][:1]
    assert check["description"].startswith("Not finished in check: dequeued by an operator.")


def test_event_whose_series_cannot_be_read_is_kept_and_handled_later(env: Env, caplog) -> None:
    """Patchwork answers the poller but not the scheduler's question about the
    series: the trigger event stays queued and is handled once it answers."""
    caplog.set_level(logging.INFO, logger="zuul_lite")
    env.start()
    env.polled(1)
    env.fake.fail(r"^/api/1\.2/series/\d+/$", 500, 3)  # every attempt of one call
    sid = env.series("one", [("one.txt", "1\n", "one: add")])
    env.wait_checks(sid, {"lint": "success", "build": "success"})
    assert "not handled yet (attempt 1)" in caplog.text and "Trying again in 2 s" in caplog.text
    assert "dropped" not in caplog.text


def test_report_refused_longer_than_retries_is_kept_and_made_later(env: Env, caplog) -> None:
    """Patchwork refuses the checks past the driver's own retries: the item
    stays in its pipeline and the report is made once Patchwork takes it."""
    caplog.set_level(logging.INFO, logger="zuul_lite")
    env.start()
    env.polled(1)
    sid = env.series("one", [("one.txt", "1\n", "one: add")])
    env.fake.fail(r"/patches/\d+/checks/", 500, 4)
    wait_until(lambda: "Could not report" in caplog.text, what="a report put off")
    assert "Trying again in 2 s" in caplog.text
    assert len(env.sched.managers["check"].pipeline.all_items()) == 1
    env.wait_checks(sid, {"lint": "success", "build": "success"})
    settle(env.sched, env.launcher)
    assert env.sched.managers["check"].pipeline.all_items() == []
    assert env.final_checks(sid) == [[("build", "success"), ("lint", "success")]]


def test_bad_token_is_logged_then_nothing_lost(env: Env, caplog) -> None:
    caplog.set_level(logging.INFO, logger="zuul_lite.connections.patchwork")
    env.start()
    env.polled(1)
    user = env.fake.tokens.pop(TOKEN)  # revoked
    sid = env.series("one", [("one.txt", "1\n", "one: add")])
    wait_until(lambda: "rejected the token (HTTP 401" in caplog.text, what="a 401 logged")
    env.fake.tokens[TOKEN] = user
    env.wait_checks(sid, {"lint": "success", "build": "success"})


def test_depends_on_in_a_cover_letter_or_commit_message(env: Env) -> None:
    """Depends-On naming another series (its list URL, as Patchwork shows it,
    or its API URL): check tests the series on top of it; in the gate, a
    series approved before the one it needs waits, and enters behind it."""
    env.start()
    a = env.series("a", [("a.txt", "a\n", "a: add")])
    env.wait_checks(a, {"lint": "success", "build": "success"})
    out = make_series(env.src, env.tmp / "series-b", [("b.txt", "b\n", "b: add")])
    b = env.fake.add_series(
        "[PATCH 0/1] b", out, cover=f"b needs a.\n\nDepends-On: {env.fake.url}/list/?series={a}\n"
    )
    message = f"c: add\n\nDepends-On: {env.fake.api}series/{b}/"
    out = make_series(env.src, env.tmp / "series-c", [("c.txt", "c\n", message)])
    c = env.fake.add_series("[PATCH] c: add", out)
    for series in (b, c):
        env.wait_checks(series, {"lint": "success", "build": "success"})
    settle(env.sched, env.launcher)
    tested = {h["changes"] for h in env.launcher.history}
    assert tested == {f"{a},1", f"{a},1 {b},1", f"{a},1 {b},1 {c},1"}

    for series in (c, b):  # c first: it waits for b, which waits for a
        for patch in env.fake.series_patches(series):
            env.fake.set_state(patch, "under-review")
    env.polled()
    settle(env.sched, env.launcher)
    assert env.sched.state.read_status()["pipelines"][1]["items"] == []
    for patch in env.fake.series_patches(a):
        env.fake.set_state(patch, "under-review")
    wait_until(
        lambda: (
            {env.fake.state_of(p) for s in (a, b, c) for p in env.fake.series_patches(s)}
            == {"accepted"}
        ),
        what="all three series accepted",
    )
    log = run_git(env.repo, "log", "--format=%s", "master").splitlines()
    assert log == ["c: add", "b: add", "a: add", "Initial commit"]


def test_series_whose_mbox_cannot_be_downloaded_gets_one_fail_check(env: Env) -> None:
    env.start()
    env.fake.fail(r"^/series/\d+/mbox/$", 404, 2)  # read for Depends-On, then to merge
    sid = env.series("one", [("one.txt", "1\n", "one: add")])
    env.wait_checks(sid, {"zuul-lite": "fail"})
    settle(env.sched, env.launcher)
    (check,) = env.fake.checks(env.fake.series_patches(sid)[0])
    assert "mbox of series" in check["description"] and "HTTP 404" in check["description"]
    assert env.launcher.history == []


@pytest.mark.parametrize(
    "config, key",
    [
        ({"project": "demo", "token": "t", "git": "/x"}, "url"),
        ({"url": "ftp://x/", "project": "demo", "token": "t", "git": "/x"}, "url"),
        ({"url": "http://x/api/1.2/", "project": "demo", "git": "/x"}, "token"),
        ({"url": "http://x/", "project": "demo", "token": "t", "git": "/x", "poll-interval": "s"},
         "poll-interval"),
        ({"url": "http://x/", "project": "demo", "token": "t", "token-file": "/t", "git": "/x"},
         "token"),
        ({"url": "http://x/", "project": "demo", "token": "t"}, "git"),
    ],
)  # fmt: skip
def test_bad_config_names_the_key(tmp_path, zk, config: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=f"^Connection pw: {key}: "):
        make_connection("pw", {"driver": "patchwork", **config}, ZuulState(zk), tmp_path)


def test_two_pollers_on_one_cursor_post_each_event_once(tmp_path, zk, fake) -> None:
    """The events of a page and the cursor past it are one versioned write:
    a poller that lost the race posts nothing (as a scheduler killed between
    posting and moving the cursor would, if they were two writes)."""
    config = {
        "driver": "patchwork",
        "url": fake.api,
        "project": "demo",
        "token": TOKEN,
        "poll-interval": 0.02,
        "git": str(tmp_path / "demo.git"),
    }
    state = ZuulState(zk)
    state.ensure_roots()
    conns = [make_connection("patchwork", config, state, tmp_path) for _ in range(2)]
    for conn in conns:
        conn.start()
    try:
        for conn in conns:
            wait_until(lambda conn=conn: conn.poller.rounds > 0, what="a first poll")
        src = make_project(tmp_path)
        out = make_series(src, tmp_path / "s", [("x.txt", "x\n", "x: add")])
        sids = [fake.add_series(f"s{i}", out) for i in range(5)]
        wait_until(lambda: len(state.trigger_events()) >= len(sids), what="the events posted")
        for conn in conns:  # and a little longer: a duplicate would show now
            start = conn.poller.rounds
            wait_until(lambda conn=conn, start=start: conn.poller.rounds > start + 1)
    finally:
        for conn in conns:
            conn.stop()
    events = [zk.get(state.trigger_event_path(n))[0] for n in state.trigger_events()]
    assert sorted(e["change"] for e in events) == sids


def test_series_whose_mbox_does_not_parse_gets_one_fail_check(env: Env) -> None:
    env.start()
    env.fake.fail(r"^/series/\d+/mbox/$", "garbage", 2)  # read for Depends-On, then to merge
    sid = env.series("one", [("one.txt", "1\n", "one: add")])
    env.wait_checks(sid, {"zuul-lite": "fail"})
    (check,) = env.fake.checks(env.fake.series_patches(sid)[0])
    assert "the series holds no patch." in check["description"]
