"""The post pipeline: every new branch head (an import, a gate merge) is built
as it is by trusted jobs, the only ones that write caches other builds read,
and reported nowhere. Real ZooKeeper, gear, git and merger; the stand-in
launcher answers builds (tests/harness.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from nodepool_lite.zk import ZooKeeper
from tests.harness import (
    FIXTURES,
    StandInLauncher,
    make_project,
    make_series,
    run_git,
    settle,
    wait_for_votes,
    write_config,
)
from zuul_lite import config as zconfig
from zuul_lite.cmd.client import format_status
from zuul_lite.connections import Report
from zuul_lite.connections.local import LocalConnection
from zuul_lite.exceptions import ConfigError
from zuul_lite.git import rev_parse
from zuul_lite.layout import load_layout
from zuul_lite.model import Change, ManagementEvent, QueueItem, TriggerEvent
from zuul_lite.scheduler import Scheduler
from zuul_lite.state import ZuulState


class Post:
    def __init__(self, tmp: Path, zk_hosts: str) -> None:
        self.tmp = tmp
        self.cfg = zconfig.load(write_config(tmp, zk_hosts, layout="post.yaml"))
        self.zk = ZooKeeper(zk_hosts)
        self.zk.connect()
        self.state = ZuulState(self.zk)
        self.src = make_project(tmp)
        self.local = LocalConnection("local", {"driver": "local"}, self.state, self.cfg.state_dir)
        self.sched: Scheduler | None = None
        self.launcher: StandInLauncher | None = None

    def start(self, hold: bool = True) -> None:
        self.sched = Scheduler(self.cfg, self.zk)
        self.sched.start()
        self.launcher = StandInLauncher(self.zk, self.sched.gearman_port)
        self.launcher.hold = hold
        self.launcher.start()

    def settle(self) -> None:
        settle(self.sched, self.launcher)

    def head(self) -> str:
        return self.local.head("demo")

    def items(self, pipeline: str) -> list[dict]:
        for p in self.state.read_status()["pipelines"]:
            if p["name"] == pipeline:
                return p["items"]
        return []

    def post_builds(self) -> list[dict]:
        return [b for b in self.launcher.builds if b["pipeline"] == "post"]

    def ref_events(self) -> list[dict]:
        events = [
            self.state.get(self.state.trigger_event_path(n)) for n in self.state.trigger_events()
        ]
        return [e for e in events if e["type"] == "ref-updated"]

    def close(self) -> None:
        if self.launcher is not None:
            self.launcher.stop()
        if self.sched is not None:
            self.sched.stop()
        self.zk.disconnect()


@pytest.fixture
def post(tmp_path, zk_hosts):
    env = Post(tmp_path, zk_hosts)
    yield env
    env.close()


def _finished(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "Finished " in r.getMessage()]


def test_import_builds_the_branch_head_in_post(post: Post, caplog) -> None:
    caplog.set_level(logging.INFO, logger="zuul_lite")
    post.local.import_project("demo", post.src)
    head = post.head()
    post.start()
    post.launcher.wait_for_builds(1, held=True)
    post.settle()
    [item] = post.items("post")
    assert Change.from_dict(item["change"]).label == f"master@{head[:12]}"
    assert f"master@{head[:12]} demo refs/heads/master [running]" in format_status(
        post.state.read_status()
    )
    assert post.state.ref_in_flight("demo", head)
    [build] = post.post_builds()
    assert (build["job"], build["change"], build["patchset"]) == ("build-trusted", 0, 0)
    assert (build["ref"], build["newrev"], build["base_ref"]) == ("refs/heads/master", head, head)
    assert (build["subject"], build["owner"], build["changes"]) == ("", "", "")
    assert build["log_path"] == f"{head[:2]}/{head}/post/build-trusted/{build['uuid']}"
    # The merger publishes the branch head exactly as it is.
    assert rev_parse(post.sched.merger.merger.workspace("demo"), build["git_ref"]) == head

    post.launcher.release()
    post.settle()
    assert post.items("post") == [] and not post.state.ref_in_flight("demo", head)
    assert post.local.list_changes() == [] and post.state.report_uuids() == []
    assert _finished(caplog) == [
        f"[e: {item['event_id']}] Finished master@{head[:12]}: success (build-trusted SUCCESS); "
        "not reported: a branch head has no change to vote on"
    ]


def test_gate_merge_builds_the_new_head_and_votes_nowhere(post: Post) -> None:
    post.local.import_project("demo", post.src)
    first = post.head()
    post.start(hold=False)
    series = make_series(post.src, post.tmp / "a", [("a.txt", "a\n", "a: add")])
    number, _ = post.local.submit(series, "demo")
    wait_for_votes(post.zk, number, count=1)  # check
    post.local.approve(number)
    wait_for_votes(post.zk, number, count=2)  # gate: merged
    post.settle()
    merged = post.head()
    assert merged != first and post.local.get_change_data(number)["status"] == "MERGED"
    builds = post.post_builds()
    assert [(b["job"], b["change"], b["newrev"]) for b in builds] == [
        ("build-trusted", 0, first),
        ("build-trusted", 0, merged),
    ]
    assert builds[1]["base_ref"] == merged
    votes = post.local.get_change_data(number)["votes"]
    assert [(v["pipeline"], v["value"]) for v in votes] == [("check", 1), ("gate", 1)]
    assert post.items("post") == [] and post.items("gate") == []
    project = post.zk.get_or_none(post.state.local_path("projects", "demo"))
    assert project["heads"] == {"master": merged}


def test_each_branch_move_is_announced_once(post: Post) -> None:
    """An import again, or a merge's report done again after a crash, posts
    no second ref-updated; a branch found at another head does."""
    post.local.import_project("demo", post.src)
    post.local.import_project("demo", post.src)
    head = post.head()
    [event] = post.ref_events()
    assert (event["ref"], event["oldrev"], event["newrev"]) == ("refs/heads/master", "", head)
    assert post.state.ref_in_flight("demo", head)  # its event waits for a scheduler
    assert not post.state.ref_in_flight("demo", "0" * 40)
    assert (event["change"], event["patchset"], event["branch"]) == (0, 0, "master")

    (post.src / "README").write_text("pushed by hand\n")
    run_git(post.src, "commit", "-qam", "README: by hand")
    run_git(post.src, "push", "-q", str(post.local.repo_path("demo")), "HEAD:master")
    post.local.import_project("demo", post.src)
    moved = post.head()
    assert [(e["oldrev"], e["newrev"]) for e in post.ref_events()] == [("", head), (head, moved)]

    series = make_series(post.src, post.tmp / "b", [("b.txt", "b\n", "b: add")])
    number, _ = post.local.submit(series, "demo")
    change = post.local.get_change(number)
    report = Report(id="r1", pipeline="gate", message="merged", verified=1, merged_sha="f" * 40)
    txn = post.state.transaction()
    post.local.report_ops(change, report, txn)  # a scheduler killed before it commits
    txn = post.state.transaction()
    post.local.report_ops(change, report, txn)
    txn.commit()
    txn = post.state.transaction()
    post.local.report_ops(change, report, txn)  # the same report once more
    txn.commit()
    events = post.ref_events()
    assert [(e["oldrev"], e["newrev"]) for e in events[2:]] == [(moved, "f" * 40)]


def test_second_event_for_a_queued_head_is_not_enqueued(post: Post, caplog) -> None:
    caplog.set_level(logging.INFO, logger="zuul_lite")
    post.local.import_project("demo", post.src)
    head = post.head()
    post.start()
    post.launcher.wait_for_builds(1, held=True)
    again = TriggerEvent(
        type="ref-updated",
        connection="local",
        project="demo",
        branch="master",
        change=0,
        patchset=0,
        ref="refs/heads/master",
        newrev=head,
    )
    post.state.put_trigger_event(again.to_dict())
    post.settle()
    assert len(post.items("post")) == 1 and len(post.post_builds()) == 1
    refused = [r.getMessage() for r in caplog.records if again.id in r.getMessage()]
    assert refused == [
        f"[e: {again.id}] not enqueued in post: refs/heads/master of demo at {head[:12]} "
        "is already in post."
    ]
    # A deleted branch (Gerrit's ref-updated to 000...) has nothing to build.
    deleted = TriggerEvent(
        type="ref-updated", connection="local", project="demo", branch="gone", change=0,
        patchset=0, ref="refs/heads/gone", oldrev=head, newrev="0" * 40,
    )  # fmt: skip
    post.state.put_trigger_event(deleted.to_dict())
    post.settle()
    assert len(post.items("post")) == 1
    assert f"[e: {deleted.id}] dropped: refs/heads/gone of demo was deleted: nothing to build" in [
        r.getMessage() for r in caplog.records
    ]
    # The gate takes changes only: a branch head is refused there, with one sentence.
    assert post.sched.managers["gate"].why_not_enqueue(
        Change("local", "demo", "master", 0, 0, ref="refs/heads/master", newrev=head)
    ) == (
        "refs/heads/master of demo is a branch head, not a change: gate gates changes "
        "before they merge."
    )


def test_trusted_job_never_runs_for_a_change(post: Post, caplog) -> None:
    """An operator enqueues a change into post: its trusted job ends ERROR
    without reaching a launcher, and nothing is reported."""
    caplog.set_level(logging.INFO, logger="zuul_lite")
    post.local.import_project("demo", post.src)
    post.start(hold=False)
    post.settle()
    series = make_series(post.src, post.tmp / "c", [("c.txt", "c\n", "c: add")])
    number, _ = post.local.submit(series, "demo")
    wait_for_votes(post.zk, number, count=1)
    post.state.put_management_event(
        ManagementEvent(type="enqueue", pipeline="post", change=number).to_dict()
    )
    post.settle()
    assert [b["change"] for b in post.post_builds()] == [0]
    assert post.items("post") == []
    assert [v["pipeline"] for v in post.local.get_change_data(number)["votes"]] == ["check"]
    assert _finished(caplog)[-1].endswith(
        f"Finished {number},1: failure (build-trusted ERROR); not reported: no failure "
        "reporter for connection local"
    )
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors[-1].endswith(
        "build-trusted not run: Job build-trusted is trusted (it writes caches other builds "
        f"read), so it runs only on merged branch heads, never on change {number},1."
    )


def test_layout_refuses_a_trusted_job_where_changes_run(tmp_path: Path) -> None:
    layout = (FIXTURES / "layouts" / "post.yaml").read_text()
    path = tmp_path / "layout.yaml"
    path.write_text(layout.replace("jobs: [noop]", "jobs: [build-trusted]"))
    with pytest.raises(ConfigError) as refused:
        load_layout(path, FIXTURES / "jobs", {"local"})
    assert str(refused.value) == (
        f"{path}: projects[0].check.jobs: job build-trusted of project demo is trusted (it "
        "writes caches other builds read), so it may run only in a pipeline triggered by "
        "ref-updated alone (merged branch heads), which check is not."
    )
    # A pipeline that also takes changes is not trusted either.
    mixed = "        - event: patchset-created\n        - event: ref-updated\n"
    path.write_text(layout.replace("        - event: ref-updated\n", mixed))
    with pytest.raises(ConfigError, match=r"which post is not\.$"):
        load_layout(path, FIXTURES / "jobs", {"local"})
    trusted = load_layout(FIXTURES / "layouts" / "post.yaml", FIXTURES / "jobs", {"local"})
    assert [p.name for p in trusted.pipelines.values() if p.trusted] == ["post"]


def test_ref_item_round_trips() -> None:
    change = Change(
        "local", "demo", "master", 0, 0, ref="refs/heads/master", newrev="ab" + "0" * 38
    )
    item = QueueItem(pipeline="post", queue="demo-ab", change=change)
    again = QueueItem.from_dict(item.to_dict())
    assert again.change == change and again.label == "master@ab0000000000"
    # An item stored before ref items existed reads as a change, as it was.
    data = item.to_dict()
    for key in ("ref", "newrev"):
        del data["change"][key]
    data["change"].update(number=3, patchset=1)
    assert QueueItem.from_dict(data).label == "3,1"


def test_ref_filter_matches_at_the_start() -> None:
    layout = load_layout(FIXTURES / "layouts" / "post.yaml", FIXTURES / "jobs", {"local"})
    [only] = layout.pipelines["post"].triggers["local"]
    event = TriggerEvent("ref-updated", "local", "demo", "master", 0, 0, ref="refs/heads/master")
    assert only.matches(event)
    for other in ("refs/tags/v1", "x/refs/heads/master"):
        event.ref = other
        assert not only.matches(event)
