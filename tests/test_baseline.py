"""Baselines (zuul_lite/baseline.py): what a post build found on a branch
head is recorded per commit and job and handed to a change's build of the
same job on that commit; a change's own findings are never recorded. Real
ZooKeeper, gear, git, merger and SQLite; the stand-in launcher answers."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from launcher.jobdir import JobDir
from launcher.logs import read_findings
from tests.harness import make_series, settle, wait_for_votes, write_config
from tests.test_post import Post
from zuul_lite import config as zconfig
from zuul_lite.baseline import Baseline, Findings, FindingsError
from zuul_lite.baseline_store import BaselineStore
from zuul_lite.build_contract import BuildResult
from zuul_lite.cmd.client import main as zuul_lite_cli
from zuul_lite.connections import BuildReport
from zuul_lite.connections.patchwork import PatchworkConnection
from zuul_lite.history.db import ALEMBIC_DIR, HistoryDB
from zuul_lite.model import Build, BuildSet, Change, EventFilter, Pipeline, QueueItem, Result
from zuul_lite.reporter import job_lines

ON_HEAD = {"tests": {"lib.add": "PASS", "lib.sub": "FAIL"}, "boot": "failed"}


class BaselineEnv(Post):
    def __init__(self, tmp, zk_hosts) -> None:
        super().__init__(tmp, zk_hosts)
        self.cfg = zconfig.load(write_config(tmp, zk_hosts, layout="baseline.yaml"))


@pytest.fixture
def env(tmp_path, zk_hosts):
    env = BaselineEnv(tmp_path, zk_hosts)
    yield env
    env.close()


def test_post_findings_become_the_baseline_of_a_change_on_that_commit(env) -> None:
    env.local.import_project("demo", env.src)
    head = env.head()
    env.start(hold=False)
    env.launcher.findings = {
        "build:0": ON_HEAD,
        "boot:0": {"boot": "failed"},
        # The change's build says which failures it did not count (the job compares).
        "build": {
            "tests": {"lib.add": "PASS", "lib.sub": "FAIL", "lib.mul": "PASS"},
            "already_failing": ["lib.sub"],
            "base": head,
        },
        # A change's findings that would clear the base's failure: never recorded.
        "boot": {"boot": "ok"},
    }
    settle(env.sched, env.launcher)
    assert [b["job"] for b in env.post_builds()] == ["build", "boot"]
    assert all(b["baseline"] is None for b in env.post_builds())
    recorded = env.sched.history.baseline("demo", head, "build")
    assert recorded.findings == Findings.from_dict(ON_HEAD)
    assert recorded.build_uuid == env.post_builds()[0]["uuid"]

    series = make_series(env.src, env.tmp / "a", [("a.txt", "a\n", "a: add")])
    number, _ = env.local.submit(series, "demo")
    [vote] = wait_for_votes(env.zk, number)
    check = {b["job"]: b for b in env.launcher.builds if b["pipeline"] == "check"}
    assert check["build"]["base_ref"] == head
    sent = Baseline.from_dict(check["build"]["baseline"])
    assert (sent.project, sent.sha, sent.job, sent.findings) == (
        "demo",
        head,
        "build",
        Findings.from_dict(ON_HEAD),
    )
    assert sent.log_url.endswith(f"/post/build/{sent.build_uuid}/")
    assert Baseline.from_dict(check["boot"]["baseline"]).findings.boot == "failed"
    assert vote["value"] == 1
    assert f"SUCCESS in 2s (already failing on base {head[:12]}: lib.sub)" in vote["message"]
    # The check builds' findings were not recorded: the post build's stay.
    settle(env.sched, env.launcher)
    assert env.sched.history.baseline("demo", head, "boot").findings.boot == "failed"
    with env.sched.history.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT job_name, sha FROM zuul_baseline")).all()
    assert sorted(rows) == [("boot", head), ("build", head)]


def test_a_change_on_a_commit_without_baseline_gets_none(env) -> None:
    env.local.import_project("demo", env.src)
    env.start(hold=False)
    settle(env.sched, env.launcher)  # post: no findings, nothing recorded
    series = make_series(env.src, env.tmp / "a", [("a.txt", "a\n", "a: add")])
    number, _ = env.local.submit(series, "demo")
    wait_for_votes(env.zk, number)
    check = [b for b in env.launcher.builds if b["pipeline"] == "check"]
    assert [b["baseline"] for b in check] == [None, None]


def test_findings_are_checked_because_a_node_wrote_them() -> None:
    with pytest.raises(FindingsError, match="test lib.x has status 'BROKEN'"):
        Findings.from_dict({"tests": {"lib.x": "BROKEN"}})
    with pytest.raises(FindingsError, match="boot is 'maybe'"):
        Findings.from_dict({"boot": "maybe"})
    with pytest.raises(FindingsError, match="warnings is not a list"):
        Findings.from_dict({"warnings": "x"})
    with pytest.raises(FindingsError, match="not a string of at most 1000"):
        Findings.from_dict({"warnings": ["x" * 1001]})
    with pytest.raises(FindingsError, match="not JSON"):
        Findings.from_json(b"{")
    with pytest.raises(FindingsError, match="larger than"):
        Findings.from_json(b" " * (513 << 10))
    assert Findings.from_json(b"{}").empty


def test_the_report_names_what_already_fails_on_base() -> None:
    many = Findings(already_failing=[f"s.t{n}" for n in range(7)], base="1a2b3c4d5e6f7a8b")
    assert many.note() == (
        "already failing on base 1a2b3c4d5e6f: s.t0, s.t1, s.t2, s.t3, s.t4 and 2 more"
    )
    assert Findings(tests={"s.t": "FAIL"}).note() == ""

    class Item:  # job_lines reads only the build set
        class buildset:  # noqa: N801
            @staticmethod
            def ordered_builds():
                return [build]

    build = Build("kernel-kunit", "n", state="completed", result=Result.SUCCESS, elapsed=30.0)
    build.note = many.note()
    assert job_lines(Item) == [
        "- kernel-kunit : SUCCESS in 30s (already failing on base 1a2b3c4d5e6f: "
        "s.t0, s.t1, s.t2, s.t3, s.t4 and 2 more)"
    ]


def test_a_newer_trusted_build_replaces_the_baseline(tmp_path) -> None:
    db = HistoryDB(f"sqlite:///{tmp_path}/history.db")
    db.upgrade()
    sha = "a" * 40
    old = Baseline("demo", sha, "kernel-kunit", "u1", "", Findings(tests={"s.t": "FAIL"}))
    db.record_baseline(old)
    db.record_baseline(Baseline("demo", sha, "kernel-kunit", "u2", "", Findings(boot="ok")))
    found = db.baseline("demo", sha, "kernel-kunit")
    assert (found.build_uuid, found.findings) == ("u2", Findings(boot="ok"))
    assert db.baseline("demo", sha, "kernel-build") is None
    assert db.baseline("other", sha, "kernel-kunit") is None


def test_a_history_database_of_before_baselines_is_migrated(tmp_path) -> None:
    url = f"sqlite:///{tmp_path}/history.db"
    db = HistoryDB(url)
    cfg = Config()
    cfg.set_main_option("script_location", str(ALEMBIC_DIR))
    with db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
    assert "zuul_baseline" not in sa.inspect(db.engine).get_table_names()
    db.upgrade()
    db.record_baseline(Baseline("demo", "b" * 40, "kernel-kunit", "u", "", Findings(boot="ok")))
    assert db.baseline("demo", "b" * 40, "kernel-kunit").findings.boot == "ok"


def test_the_launcher_reads_the_findings_a_job_left(tmp_path, caplog) -> None:
    jobdir = JobDir(tmp_path, "b" * 32)
    jobdir.artifacts.mkdir(parents=True)
    assert read_findings(jobdir) is None  # a job that says nothing
    path = jobdir.artifacts / "findings.json"
    path.write_text('{"tests": {"s.t": "FAIL"}, "boot": "ok"}')
    assert read_findings(jobdir) == Findings(tests={"s.t": "FAIL"}, boot="ok").to_dict()
    path.write_text('{"tests": {"s.t": "EVIL"}}')
    assert read_findings(jobdir) is None
    assert "Ignoring the job's findings.json: test s.t has status 'EVIL'." in caplog.text
    path.unlink()
    path.symlink_to("/etc/hostname")  # unpacking skips links; never followed anyway
    assert read_findings(jobdir) is None


def test_a_patchwork_check_says_what_failed_or_was_not_counted() -> None:
    """One line per job: the first error line, not the launcher's task header;
    for a pass, the failures it did not count."""
    summary = (
        "Task 'kernel-tools : Boot the kernel under QEMU (tcg, timeout 120 s)' failed in "
        "run-0.yaml:\nERROR: the kernel did not boot: QEMU exited with 0 before the marker\n"
        "    [    1.5] Kernel panic - not syncing: No working init found."
    )
    failed = BuildReport("kernel-boot-qemu", "FAILURE", "http://l/1/", 41.0, summary)
    assert PatchworkConnection._job_check(failed, "[tag]")["description"] == (
        "FAILURE in 41s: ERROR: the kernel did not boot: QEMU exited with 0 before the marker "
        "[tag]"
    )
    note = "already failing on base 1a2b3c4d5e6f: lib.sub"
    passed = BuildReport("kernel-kunit", "SUCCESS", None, 30.0, "", note)
    assert PatchworkConnection._job_check(passed, "[tag]")["description"] == (
        f"SUCCESS in 30s: {note} [tag]"
    )


def test_the_cli_lists_the_baselines_a_change_compares_with(tmp_path, zk_hosts, capsys) -> None:
    conf = write_config(tmp_path, zk_hosts)
    cfg = zconfig.load(conf)
    db = HistoryDB(cfg.dburi)
    db.upgrade()
    failing = Findings(tests={"s.a": "PASS", "s.b": "FAIL"}, boot="ok")
    url = "http://logs/1/"
    db.record_baseline(Baseline("linux", "a" * 40, "kernel-kunit", "u1", url, failing))
    warned = Findings(warnings=["kernel/panic.c|f|w1"], warning_files=["kernel/panic.c"])
    db.record_baseline(Baseline("linux", "b" * 40, "kernel-build", "u2", "", warned))
    assert zuul_lite_cli(["-c", str(conf), "baselines", "--commit", "AAAA"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"linux {'a' * 12} kernel-kunit (recorded ")
    assert out[0].endswith("UTC): 2 tests, 1 failing (s.b); boot ok")
    assert out[1:] == ["    http://logs/1/"]
    assert zuul_lite_cli(["-c", str(conf), "baselines", "--job", "kernel-build"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith(": 1 warnings in 1 compiled files") and out[1] == "    build u2"
    assert zuul_lite_cli(["-c", str(conf), "baselines", "--project", "other"]) == 0
    assert capsys.readouterr().out.startswith("No baselines recorded")


def test_a_baseline_recorded_after_a_lookup_on_its_commit_is_seen(tmp_path) -> None:
    """The store keeps what it read of a commit (a burst of check items on one
    branch head reads it once); a trusted build recording on that commit
    replaces it, so the next change's build gets the new baseline."""
    db = HistoryDB(f"sqlite:///{tmp_path}/history.db")
    db.upgrade()
    store = BaselineStore(db)
    sha = "c" * 40
    change = QueueItem("check", "q", Change("local", "demo", "master", 7, 1))
    change.buildset = BuildSet(base_sha=sha)
    build = Build("kernel-kunit", "n")
    assert store.for_build(change, build) is None
    post = Pipeline("post", "independent", "local", {"local": [EventFilter("ref-updated")]})
    head = QueueItem("post", "q", Change("local", "demo", "master", 0, 0, newrev=sha))
    findings = {"tests": {"s.t": "FAIL"}}
    store.on_result(
        post, head, Build("kernel-kunit", "n"), BuildResult("FAILURE", None, 1.0, "", findings)
    )
    found = store.for_build(change, build)
    assert found is not None and found["findings"]["tests"] == {"s.t": "FAIL"}
