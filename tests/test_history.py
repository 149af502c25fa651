"""The build history: rows from queue items, idempotent writes, queries and
migrations, on a real SQLite file."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa

from tests.harness import (
    StandInLauncher,
    local_project,
    make_series,
    noop_check_run,
    settle,
    wait_for_votes,
)
from zuul_lite.history.db import Filters, HistoryDB, HistoryError
from zuul_lite.history.records import item_record
from zuul_lite.model import Build, BuildSet, BuildState, Change, ManagementEvent, QueueItem
from zuul_lite.scheduler import Scheduler
from zuul_lite.state import ZuulState


def make_item(number: int, results: dict[str, str], pipeline: str = "check") -> QueueItem:
    change = Change("local", "demo", "master", number, 1, subject=f"fix {number}", owner="Dev")
    bs = BuildSet(changes=[f"{number},1"], merge_state="complete")
    for index, (job, result) in enumerate(results.items()):
        bs.builds[job] = Build(
            job=job,
            node_type="debian",
            state=BuildState.COMPLETED,
            result=result,
            start_time=1000.0 + index,
            end_time=1010.0 + index,
            elapsed=10.0,
            log_url=f"http://logs/{number}/1/{pipeline}/{job}/",
            log_path=f"{number}/1/{pipeline}/{job}/x",
            index=index,
        )
    return QueueItem(
        pipeline=pipeline, queue="demo", change=change, enqueue_time=990.0, buildset=bs
    )


def db_at(tmp_path, name: str = "history.sqlite") -> HistoryDB:
    db = HistoryDB(f"sqlite:///{tmp_path / 'state' / name}")
    db.upgrade()
    return db


def test_item_is_recorded_once_however_often_it_is_written(tmp_path):
    db = db_at(tmp_path)
    item = make_item(1, {"lint": "SUCCESS", "build": "FAILURE"})
    record = item_record(item, "FAILURE", message="")
    db.record(record)
    first = db.buildset(item.buildset.uuid)
    # A scheduler killed after the write and before the item left ZooKeeper
    # writes the same item again on restart.
    db.record(item_record(item, "FAILURE"))
    assert len(db.buildsets(Filters())) == 1
    assert len(db.builds(Filters())) == 2
    again = db.buildset(item.buildset.uuid)
    assert again["report_time"] == first["report_time"]
    assert [b["job_name"] for b in again["builds"]] == ["lint", "build"]
    assert again["result"] == "FAILURE" and again["changes"] == "1,1"
    assert again["first_build_start_time"] == 1000.0
    assert again["last_build_end_time"] == 1011.0


def test_filters(tmp_path):
    db = db_at(tmp_path)
    db.record(item_record(make_item(1, {"lint": "SUCCESS", "build": "FAILURE"}), "FAILURE"))
    db.record(item_record(make_item(2, {"lint": "SUCCESS"}, "gate"), "SUCCESS", merged=True))
    assert [b["change"] for b in db.builds(Filters(job="lint"))] == [2, 1]
    assert [b["job_name"] for b in db.builds(Filters(result="FAILURE"))] == ["build"]
    assert [b["change"] for b in db.builds(Filters(pipeline="gate"))] == [2]
    assert db.builds(Filters(project="other")) == []
    assert [b["job_name"] for b in db.builds(Filters(change=1))] == ["build", "lint"]
    sets = db.buildsets(Filters(result="SUCCESS"))
    assert [(s["change"], s["merged"]) for s in sets] == [(2, True)]
    assert [s["change"] for s in db.buildsets(Filters(job="build"))] == [1]
    build = db.builds(Filters(job="build"))[0]
    assert build["buildset"]["result"] == "FAILURE"
    assert db.build(build["uuid"])["log_path"] == "1/1/check/build/x"
    assert db.build("0" * 32) is None
    assert len(db.builds(Filters(), limit=1)) == 1
    assert [b["change"] for b in db.builds(Filters(job="lint"), offset=1)] == [1]
    # Enqueued at 990 and reported now: a long wait, and none in the last second.
    assert all(t > 1e9 for t in db.vote_times(since=0)) and len(db.vote_times(since=0)) == 2
    assert db.vote_times(since=0, pipeline="gate") != [] and db.vote_times(since=4e9) == []
    assert db.job_durations("lint") == [10.0, 10.0]


def test_migration_of_an_empty_and_an_existing_database(tmp_path):
    path = tmp_path / "state" / "old.sqlite"
    path.parent.mkdir()
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:  # a database holding something else already
        conn.execute(sa.text("CREATE TABLE other (x INTEGER)"))
        conn.execute(sa.text("INSERT INTO other VALUES (7)"))
    engine.dispose()
    db = db_at(tmp_path, "old.sqlite")
    db.record(item_record(make_item(3, {"lint": "SUCCESS"}), "SUCCESS"))
    db.dispose()
    again = db_at(tmp_path, "old.sqlite")  # a restart: nothing to migrate, nothing lost
    assert [s["change"] for s in again.buildsets(Filters())] == [3]
    with again.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() == "0002"
        assert conn.execute(sa.text("SELECT x FROM other")).scalar() == 7


def test_unusable_database_is_one_sentence(tmp_path):
    for dburi in ("not a url", "nosuchdialect://x/y"):
        try:
            HistoryDB(dburi).upgrade()
        except HistoryError as error:
            assert "\n" not in str(error) and "Traceback" not in str(error)
        else:
            raise AssertionError(f"{dburi} was accepted")
    # The web reading a database the scheduler has not migrated yet.
    empty = HistoryDB(f"sqlite:///{tmp_path / 'empty.sqlite'}")
    try:
        empty.builds(Filters())
    except HistoryError as error:
        assert "no such table" in str(error) and "SELECT" not in str(error)
    else:
        raise AssertionError("an empty database was read")


def test_a_check_run_leaves_its_builds_in_sql(tmp_path, zk_hosts):
    """A real check run: the vote and the history agree."""
    with noop_check_run(tmp_path, zk_hosts) as (cfg, _, change):
        pass
    db = HistoryDB(cfg.dburi)
    assert cfg.dburi == f"sqlite:///{tmp_path / 'state' / 'history.sqlite'}"
    (buildset,) = db.buildsets(Filters(change=change))
    assert (buildset["pipeline"], buildset["result"], buildset["subject"]) == (
        "check", "SUCCESS", "README: more"
    )  # fmt: skip
    (build,) = db.builds(Filters(change=change))
    assert (build["job_name"], build["result"], build["node_type"]) == ("noop", "SUCCESS", None)
    assert build["log_path"] == f"{change}/1/check/noop/{build['uuid']}"


def submit(local, src, root) -> int:
    """A one-patch series of project demo into the local inbox; its change number."""
    return local.submit(make_series(src, root / "s", [("README", "x\n", "x")]), "demo")[0]


class Killed(BaseException):
    """Ends the scheduler thread where it is raised, as kill -9 would: its
    loop catches Exception only, so nothing after that line runs."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_scheduler_killed_between_the_sql_write_and_zookeeper(tmp_path, zk_hosts):
    """The item's rows are in SQL but the item is still in ZooKeeper, not
    voted on: the next scheduler votes and writes the same rows again,
    so the history holds the item once."""
    cfg, zk, local, src = local_project(tmp_path, zk_hosts, "noop.yaml")
    first = Scheduler(cfg, zk)
    written = threading.Event()
    record = first.history.record_many

    def record_then_die(rows):
        record(rows)
        written.set()
        raise Killed

    first.history.record_many = record_then_die
    first.start()
    change = submit(local, src, tmp_path)
    assert written.wait(30)
    first.join(10)
    first.stop()
    assert HistoryDB(cfg.dburi).buildsets(Filters(change=change)) != []
    assert ZuulState(zk).read_status()["pipelines"][0]["items"] != []  # still queued
    second = Scheduler(cfg, zk)
    second.start()
    try:
        assert [v["value"] for v in wait_for_votes(zk, change)] == [1]
        settle(second)
    finally:
        second.stop()
        zk.disconnect()
    db = HistoryDB(cfg.dburi)
    assert len(db.buildsets(Filters(change=change))) == 1
    assert len(db.builds(Filters(change=change))) == 1


def test_a_database_that_refuses_keeps_the_item_until_it_takes_it(tmp_path, zk_hosts):
    """No vote leaves before its history is written: the item waits and the
    write is tried again (after 2 s), like a report a review system refused."""
    cfg, zk, local, src = local_project(tmp_path, zk_hosts, "noop.yaml")
    sched = Scheduler(cfg, zk)
    record = sched.history.record_many
    refused = []

    def refuse_once(rows):
        if not refused:
            refused.append(rows[0].uuid)
            raise HistoryError("The database is away.")
        record(rows)

    sched.history.record_many = refuse_once
    sched.start()
    try:
        change = submit(local, src, tmp_path)
        assert [v["value"] for v in wait_for_votes(zk, change)] == [1]
        settle(sched)
    finally:
        sched.stop()
        zk.disconnect()
    (buildset,) = HistoryDB(cfg.dburi).buildsets(Filters(change=change))
    assert refused == [buildset["uuid"]]


def test_an_item_dequeued_after_its_builds_started_is_history_too(tmp_path, zk_hosts):
    cfg, zk, local, src = local_project(tmp_path, zk_hosts, "demo.yaml")
    sched = Scheduler(cfg, zk)
    sched.start()
    launcher = StandInLauncher(zk, sched.gearman_port)
    launcher.hold = True
    launcher.start()
    try:
        change = submit(local, src, tmp_path)
        launcher.wait_for_builds(1, held=True)
        sched.state.put_management_event(
            ManagementEvent(type="dequeue", pipeline="check", change=change).to_dict()
        )
        settle(sched, launcher)
    finally:
        launcher.stop()
        sched.stop()
        zk.disconnect()
    (buildset,) = HistoryDB(cfg.dburi).buildsets(Filters(change=change))
    assert (buildset["result"], buildset["message"]) == ("DEQUEUED", "dequeued by an operator")
