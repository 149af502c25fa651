"""The scheduler with real ZooKeeper, real gear, real git; a stand-in launcher."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from nodepool_lite.zk import ZooKeeper
from tests.harness import (
    StandInLauncher,
    make_project,
    make_series,
    settle,
    start_scheduler_process,
    wait_for_votes,
    write_config,
)
from zuul_lite import config as zconfig
from zuul_lite.connections.local import LocalConnection
from zuul_lite.exceptions import InboxError
from zuul_lite.git import git
from zuul_lite.scheduler import Scheduler
from zuul_lite.state import ZuulState


@pytest.fixture
def env(tmp_path, zk_hosts):
    cfg = zconfig.load(write_config(tmp_path, zk_hosts))
    zk = ZooKeeper(zk_hosts)
    zk.connect()
    src = make_project(tmp_path)
    local = LocalConnection("local", {"driver": "local"}, ZuulState(zk), cfg.state_dir)
    local.import_project("demo", src)
    yield cfg, zk, local, src, tmp_path
    zk.disconnect()


@pytest.fixture
def scheduler(env):
    cfg, zk, *_ = env
    sched = Scheduler(cfg, zk)
    sched.start()
    yield sched
    sched.stop()


def good_series(src: Path, out: Path) -> Path:
    return make_series(
        src,
        out,
        [
            ("hello.c", "int main(void)\n{\n\treturn 1;\n}\n", "hello: return 1"),
            ("README", "demo project\n", "README: say more"),
        ],
    )


def test_good_series_gets_plus_one(env, scheduler):
    cfg, zk, local, src, tmp = env
    launcher = StandInLauncher(zk, scheduler.gearman_port)
    launcher.start()
    change, ps = local.submit(good_series(src, tmp / "good"), "demo")
    votes = wait_for_votes(zk, change)
    launcher.stop()
    assert len(votes) == 1
    assert votes[0]["value"] == 1
    assert "Build succeeded" in votes[0]["message"]
    for job in ("lint", "build", "boot"):
        assert f"- {job} http://logs/{change}/1/check/{job}/" in votes[0]["message"]
    args = {b["job"]: b for b in launcher.builds}
    assert set(args) == {"lint", "build", "boot"}
    for key in (
        "uuid",
        "job",
        "node_type",
        "project",
        "branch",
        "change",
        "patchset",
        "pipeline",
        "git_ref",
        "vars",
        "timeout",
    ):
        assert key in args["build"]
    # The job definition says how the launcher prepares the node.
    assert (args["lint"]["checkout"], args["build"]["checkout"]) == (False, True)
    # Paths relative to the log root: each launcher joins them with its own.
    assert args["boot"]["artifacts"] == {"build": args["build"]["log_path"]}
    # The merger's repository is served over git at the URL the builds name.
    assert args["build"]["git_url"] == f"git://127.0.0.1:{cfg.git_port}/demo"
    assert "refs/heads/master" in git(None, "ls-remote", args["build"]["git_url"])
    # The published ref was dropped after the report; the merge was real.
    ws = cfg.state_dir / "merger" / "demo"
    assert "return 1;" in git(ws, "show", "HEAD:hello.c")
    assert ZuulState(zk).read_status()["pipelines"][0]["items"] == []


def test_series_that_does_not_apply_is_merge_conflict(env, scheduler):
    cfg, zk, local, src, tmp = env
    launcher = StandInLauncher(zk, scheduler.gearman_port)
    launcher.start()
    series = make_series(
        src,
        tmp / "conflict",
        [
            ("README", "demo project\n", "README: say more"),
            ("README", "demo project, version 2\n", "README: version 2"),
        ],
    )
    (series / "0001-README-say-more.patch").unlink()
    change, _ = local.submit(series, "demo")
    votes = wait_for_votes(zk, change)
    launcher.stop()
    assert votes[0]["value"] == -1
    assert "MERGE_CONFLICT" in votes[0]["message"]
    assert "Patch 1 ('README: version 2') does not apply" in votes[0]["message"]
    assert launcher.builds == []


def test_failed_dependency_skips_dependent_job(env, scheduler):
    cfg, zk, local, src, tmp = env
    launcher = StandInLauncher(zk, scheduler.gearman_port, results={"build": "FAILURE"})
    launcher.start()
    change, _ = local.submit(good_series(src, tmp / "good"), "demo")
    votes = wait_for_votes(zk, change)
    launcher.stop()
    msg = votes[0]["message"]
    assert votes[0]["value"] == -1
    assert "- build http" in msg and ": FAILURE in 2s" in msg
    assert "build: error: something broke" in msg
    assert "- boot : SKIPPED" in msg
    assert {b["job"] for b in launcher.builds} == {"lint", "build"}


def test_recheck_runs_again(env, scheduler):
    cfg, zk, local, src, tmp = env
    launcher = StandInLauncher(zk, scheduler.gearman_port)
    launcher.start()
    change, _ = local.submit(good_series(src, tmp / "good"), "demo")
    wait_for_votes(zk, change)
    local.recheck(change)
    votes = wait_for_votes(zk, change, count=2)
    launcher.stop()
    assert [v["value"] for v in votes] == [1, 1]
    assert len(launcher.builds) == 6


def test_bad_input_is_one_sentence(env, tmp_path):
    cfg, zk, local, src, tmp = env
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InboxError, match="holds no patches"):
        local.submit(empty, "demo")
    bad = tmp_path / "bad.mbox"
    bad.write_text("From nobody Mon Sep 17 00:00:00 2001\nSubject: hi\n\nno diff here\n")
    with pytest.raises(InboxError, match="holds no diff"):
        local.submit(bad, "demo")
    with pytest.raises(InboxError, match="Unknown project nope"):
        local.submit(good_series(src, tmp / "good"), "nope")
    assert local.list_changes() == []


def test_bad_layout_is_refused_and_old_one_kept(env, scheduler, tmp_path):
    cfg, zk, local, src, tmp = env
    bad = tmp_path / "bad-layout.yaml"
    bad.write_text(
        "pipelines:\n  - name: check\n    manager: sideways\n"
        "    source: local\n    trigger: {}\nprojects: []\n"
    )
    cfg.layout_path = bad
    old = scheduler.layout
    scheduler.reconfigure()
    settle(scheduler)
    assert scheduler.layout is old
    from zuul_lite.exceptions import ConfigError
    from zuul_lite.layout import load_layout

    with pytest.raises(ConfigError, match=r"pipelines\[0\]\.manager"):
        load_layout(bad, cfg.jobs_dir, {"local"})


def test_scheduler_killed_mid_build_votes_exactly_once(env, tmp_path):
    """kill -9 the scheduler (and its embedded gear server) while one build runs
    and two wait; the restarted scheduler adopts the running build's result,
    resubmits the lost ones, and each change gets exactly one vote."""
    cfg, zk, local, src, tmp = env
    proc = start_scheduler_process(cfg.path, tmp_path / "sched1.log")
    launcher = StandInLauncher(zk, cfg.gearman_port)
    launcher.hold = True
    launcher.start()
    change, _ = local.submit(good_series(src, tmp / "good"), "demo")
    launcher.wait_for_builds(2, held=True)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    launcher.hold = False
    launcher.release()  # results land in ZK while no scheduler runs
    launcher.stop()
    proc = start_scheduler_process(cfg.path, tmp_path / "sched2.log")
    launcher2 = StandInLauncher(zk, cfg.gearman_port)
    launcher2.start()
    try:
        votes = wait_for_votes(zk, change, timeout=60)
        assert votes[0]["value"] == 1
        shown = [ln.split()[1] for ln in votes[0]["message"].splitlines() if ln.startswith("- ")]
        assert shown == ["lint", "build", "boot"]  # layout order survives the restart
        time.sleep(2)  # a duplicate vote would arrive now
        assert len(local.get_change_data(change)["votes"]) == 1
        assert {b["job"] for b in launcher2.builds} == {"boot"}
    finally:
        launcher2.stop()
        proc.terminate()
        proc.wait()


def test_git_port_in_use_stops_the_start_with_one_sentence(env, tmp_path):
    cfg, *_ = env
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    data = yaml.safe_load(cfg.path.read_text())
    data["merger"]["git-port"] = port
    cfg.path.write_text(yaml.safe_dump(data))
    try:
        proc = start_scheduler_process(cfg.path, tmp_path / "sched.log", stderr=subprocess.PIPE)
        _, err = proc.communicate(timeout=60)
    finally:
        taken.close()
    assert proc.returncode == 1
    assert err.decode() == (
        f"zuul-lite: The git server could not listen on 127.0.0.1:{port}: "
        "Could not bind to 127.0.0.1: Address already in use.\n"
    )


def test_new_patchset_supersedes_the_old_one(env, scheduler):
    cfg, zk, local, src, tmp = env
    launcher = StandInLauncher(zk, scheduler.gearman_port)
    launcher.hold = True
    launcher.start()
    change, _ = local.submit(good_series(src, tmp / "good"), "demo")
    launcher.wait_for_builds(2, held=True)
    local.submit(good_series(src, tmp / "good2"), "demo", change=change)
    launcher.wait_for_builds(4)
    launcher.hold = False
    launcher.release()
    votes = wait_for_votes(zk, change)
    launcher.stop()
    assert [(v["patchset"], v["value"]) for v in votes] == [(2, 1)]
    assert len(local.get_change_data(change)["votes"]) == 1


def test_item_stored_by_model_api_1_is_resumed(env, tmp_path):
    """An upgrade loses no change: an item in the old shape is started over."""
    cfg, zk, local, src, tmp = env
    change, ps = local.submit(good_series(src, tmp / "good"), "demo")
    state = ZuulState(zk)
    for name in state.trigger_events():
        zk.delete(state.trigger_event_path(name))
    zk.create(
        state.item_path("check", "old1"),
        {"uuid": "old1", "pipeline": "check", "connection": "local", "project": "demo",
         "branch": "master", "change": change, "patchset": ps, "subject": "old",
         "owner": "dev", "event_id": "e-old", "state": "running", "builds": {}},
    )  # fmt: skip
    sched = Scheduler(cfg, zk)
    sched.start()
    launcher = StandInLauncher(zk, sched.gearman_port)
    launcher.start()
    try:
        votes = wait_for_votes(zk, change)
        assert votes[0]["value"] == 1
    finally:
        launcher.stop()
        sched.stop()
