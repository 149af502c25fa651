"""The history database: written by the scheduler, read by the web.

Writes are idempotent, keyed by the build set's and each build's uuid: the
scheduler records an item before the transaction that takes it out of
ZooKeeper, so a scheduler killed between the two records the item again on
restart and the second write replaces the first instead of adding a row.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from zuul_lite.baseline import Baseline, Findings
from zuul_lite.exceptions import ZuulLiteError
from zuul_lite.history.records import BuildsetRecord
from zuul_lite.history.schema import baseline_table, build_table, buildset_table

log = logging.getLogger("zuul_lite.history")

ALEMBIC_DIR = Path(__file__).parent / "alembic"
MAX_LIMIT = 1000


class HistoryError(ZuulLiteError):
    """The history database could not be reached or refused a statement."""


def redact(dburi: str) -> str:
    """The URL without its password, for logs and error sentences."""
    try:
        return sa.engine.make_url(dburi).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "(a database URL SQLAlchemy cannot parse)"


@dataclass(frozen=True, slots=True)
class Filters:
    """What /builds and /buildsets may be narrowed to; None: any."""

    project: str | None = None
    pipeline: str | None = None
    job: str | None = None
    result: str | None = None
    change: int | None = None
    patchset: int | None = None
    uuid: str | None = None


class HistoryDB:
    def __init__(self, dburi: str) -> None:
        self.dburi = dburi
        try:
            url = sa.engine.make_url(dburi)
        except sa.exc.ArgumentError:
            raise HistoryError(f"{redact(dburi)} is not a database URL.") from None
        if url.get_backend_name() == "sqlite" and url.database:
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.engine: Engine = sa.create_engine(url, pool_pre_ping=True)
        except (SQLAlchemyError, ImportError) as error:
            raise HistoryError(f"Cannot use {redact(dburi)}: {error}") from None
        if url.get_backend_name() == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)

    def dispose(self) -> None:
        self.engine.dispose()

    # Schema ----------------------------------------------------------------

    def upgrade(self) -> None:
        """`alembic upgrade head`, run in-process on this engine: an empty
        database gets every table, an older one its missing migrations."""
        cfg = Config()
        cfg.set_main_option("script_location", str(ALEMBIC_DIR))
        try:
            with self.engine.begin() as conn:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
        except SQLAlchemyError as error:
            raise HistoryError(f"Cannot migrate {redact(self.dburi)}: {_brief(error)}") from None
        log.info("History database %s is at the newest schema", redact(self.dburi))

    # Writes ----------------------------------------------------------------

    def record(self, record: BuildsetRecord) -> None:
        """Insert or replace the build set and its builds, in one transaction."""
        self.record_many([record])

    def record_many(self, records: list[BuildsetRecord]) -> None:
        """Insert or replace build sets and their builds, all in one
        transaction: the items a scheduler pass reports together cost one
        commit and a few statements, not a commit and four statements each."""
        if not records:
            return
        try:
            with self.engine.begin() as conn:
                ids = _upsert_many(
                    conn, buildset_table, [r.to_row() for r in records], keep=("report_time",)
                )
                rows = [
                    {**build.to_row(), "buildset_id": bs_id}
                    for record, bs_id in zip(records, ids, strict=True)
                    for build in record.builds
                ]
                _upsert_many(conn, build_table, rows)
        except SQLAlchemyError as error:
            which = ", ".join(r.uuid for r in records[:3]) + (" ..." if len(records) > 3 else "")
            raise HistoryError(
                f"Cannot record build set {which} in {redact(self.dburi)}: {_brief(error)}"
            ) from None

    def record_baseline(self, baseline: Baseline) -> None:
        """Keep `baseline` as the one of its project, commit and job (the
        newest trusted build of them replaces an older one)."""
        t = baseline_table
        key = (t.c.project == baseline.project, t.c.sha == baseline.sha,
               t.c.job_name == baseline.job)  # fmt: skip
        try:
            with self.engine.begin() as conn:
                conn.execute(t.delete().where(*key))
                conn.execute(
                    t.insert().values(
                        project=baseline.project,
                        sha=baseline.sha,
                        job_name=baseline.job,
                        build_uuid=baseline.build_uuid,
                        log_url=baseline.log_url,
                        findings=json.dumps(baseline.findings.to_dict()),
                        record_time=time.time(),
                    )
                )
        except SQLAlchemyError as error:
            raise HistoryError(
                f"Cannot record the baseline of {baseline.job} on {baseline.sha[:12]} "
                f"in {redact(self.dburi)}: {_brief(error)}"
            ) from None

    # Reads -----------------------------------------------------------------

    def baseline(self, project: str, sha: str, job: str) -> Baseline | None:
        return self.commit_baselines(project, sha).get(job)

    def commit_baselines(self, project: str, sha: str) -> dict[str, Baseline]:
        """The baseline of each job recorded on commit `sha`, by job: one read
        for all the builds of an item (an unreadable one is left out)."""
        t = baseline_table
        rows = self._read(sa.select(t).where(t.c.project == project, t.c.sha == sha))
        found = (_baseline_of(row) for row in rows)
        return {b.job: b for b in found if b is not None}

    def baselines(
        self,
        project: str | None = None,
        job: str | None = None,
        sha: str | None = None,
        limit: int = 50,
    ) -> list[tuple[Baseline, float]]:
        """Recorded baselines, newest first, with when each was recorded;
        `sha` may be a prefix of the commit. An unreadable one is left out."""
        t = baseline_table
        conditions = [t.c.project == project] if project else []
        conditions += [t.c.job_name == job] if job else []
        conditions += [t.c.sha.startswith(sha.lower(), autoescape=True)] if sha else []
        rows = self._read(
            sa.select(t).where(*conditions).order_by(t.c.record_time.desc()).limit(_clamp(limit))
        )
        found = [(_baseline_of(row), row.record_time) for row in rows]
        return [(baseline, when) for baseline, when in found if baseline is not None]

    def builds(self, filters: Filters, limit: int = 50, offset: int = 0) -> list[dict[str, Any]]:
        """Builds, newest first, each with its build set's change and pipeline."""
        b, bs = build_table, buildset_table
        query = (
            sa.select(*b.c, *_buildset_columns())
            .join(bs, b.c.buildset_id == bs.c.id)
            .where(*_conditions(filters, build=True))
            .order_by(b.c.id.desc())
            .limit(_clamp(limit))
            .offset(max(0, offset))
        )
        return [_build_row(row) for row in self._read(query)]

    def build(self, uuid: str) -> dict[str, Any] | None:
        found = self.builds(Filters(uuid=uuid), limit=1)
        return found[0] if found else None

    def buildsets(
        self, filters: Filters, limit: int = 50, offset: int = 0
    ) -> list[dict[str, Any]]:
        """Build sets, newest first; a job filter keeps those that ran the job."""
        bs = buildset_table
        query = sa.select(bs).where(*_conditions(filters, build=False))
        if filters.job is not None:
            ran = sa.select(build_table.c.buildset_id).where(build_table.c.job_name == filters.job)
            query = query.where(bs.c.id.in_(ran))
        query = query.order_by(bs.c.id.desc()).limit(_clamp(limit)).offset(max(0, offset))
        return [_public(row._asdict()) for row in self._read(query)]

    def buildset(self, uuid: str) -> dict[str, Any] | None:
        """One build set with its builds in layout order."""
        rows = self._read(sa.select(buildset_table).where(buildset_table.c.uuid == uuid))
        if not rows:
            return None
        found = rows[0]._asdict()
        builds = self._read(
            sa.select(build_table)
            .where(build_table.c.buildset_id == found["id"])
            .order_by(build_table.c.position)
        )
        return {**_public(found), "builds": [_public(r._asdict()) for r in builds]}

    def vote_times(self, since: float, pipeline: str | None = None) -> list[float]:
        """Seconds from enqueue to report of each build set reported since `since`."""
        bs = buildset_table
        query = sa.select(bs.c.report_time - bs.c.enqueue_time).where(
            bs.c.report_time >= since, bs.c.enqueue_time.is_not(None), bs.c.result != "DEQUEUED"
        )
        if pipeline is not None:
            query = query.where(bs.c.pipeline == pipeline)
        return [row[0] for row in self._read(query)]

    def job_durations(self, job: str, limit: int = 10) -> list[float]:
        """Elapsed seconds of the newest successful builds of `job` (for estimates)."""
        b = build_table
        query = (
            sa.select(b.c.elapsed)
            .where(b.c.job_name == job, b.c.result == "SUCCESS", b.c.elapsed.is_not(None))
            .order_by(b.c.id.desc())
            .limit(limit)
        )
        return [row[0] for row in self._read(query)]

    def _read(self, query: sa.Select) -> list[sa.Row]:
        try:
            with self.engine.connect() as conn:
                return list(conn.execute(query))
        except SQLAlchemyError as error:
            raise HistoryError(
                f"The build history ({redact(self.dburi)}) cannot be read: {_brief(error)}"
            ) from None


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    """The scheduler writes while the web reads: WAL lets them both, and a
    busy timeout makes a writer wait for a reader instead of failing."""
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _brief(error: SQLAlchemyError) -> str:
    """The driver's first line, without SQLAlchemy's statement and parameters."""
    text = str(getattr(error, "orig", None) or error)
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__


def _upsert_many(
    conn: Connection, table: sa.Table, rows: list[dict], keep: tuple[str, ...] = ()
) -> list[int]:
    """Insert `rows`, or update the row with each one's uuid (but not the
    `keep` columns); the ids, in the order of `rows`. One SELECT finds the
    rows there already (a scheduler restarted between recording and
    reporting records an item again) and one multi-row INSERT adds the
    rest. Portable across SQLite and PostgreSQL; only the scheduler writes,
    so no two writers race on a uuid."""
    if not rows:
        return []
    found = {
        row.uuid: row.id
        for row in conn.execute(
            sa.select(table.c.uuid, table.c.id).where(table.c.uuid.in_([r["uuid"] for r in rows]))
        )
    }
    for row in rows:
        if row["uuid"] in found:
            update = {k: v for k, v in row.items() if k not in keep}
            conn.execute(table.update().where(table.c.id == found[row["uuid"]]).values(**update))
    new = [row for row in rows if row["uuid"] not in found]
    if new:
        inserted = conn.execute(
            table.insert().returning(table.c.uuid, table.c.id, sort_by_parameter_order=True),
            new,
        )
        found.update((row.uuid, row.id) for row in inserted)
    return [found[row["uuid"]] for row in rows]


def _baseline_of(row: Any) -> Baseline | None:
    """A zuul_baseline row as a Baseline; None (logged) if its findings are unreadable."""
    try:
        findings = Findings.from_dict(json.loads(row.findings))
    except ValueError as error:
        log.warning(
            "The baseline of %s on %s is unreadable: %s", row.job_name, row.sha[:12], error
        )
        return None
    return Baseline(
        row.project, row.sha, row.job_name, row.build_uuid, row.log_url or "", findings
    )


def _clamp(limit: int) -> int:
    return min(max(1, limit), MAX_LIMIT)


def _buildset_columns() -> list:
    bs = buildset_table
    names = ("pipeline", "project", "branch", "change", "patchset", "ref", "newrev",
             "changes", "event_id", "subject", "owner", "change_url")  # fmt: skip
    return [bs.c.uuid.label("buildset_uuid"), bs.c.result.label("buildset_result"),
            *(bs.c[n] for n in names)]  # fmt: skip


def _conditions(filters: Filters, build: bool) -> list:
    b, bs = build_table, buildset_table
    where = []
    for name in ("project", "pipeline", "change", "patchset"):
        value = getattr(filters, name)
        if value is not None:
            where.append(bs.c[name] == value)
    if filters.result is not None:
        where.append((b.c.result if build else bs.c.result) == filters.result)
    if build and filters.job is not None:
        where.append(b.c.job_name == filters.job)
    if filters.uuid is not None:
        where.append((b.c.uuid if build else bs.c.uuid) == filters.uuid)
    return where


def _public(row: dict[str, Any]) -> dict[str, Any]:
    """Row ids and foreign keys are the database's business."""
    return {k: v for k, v in row.items() if k not in ("id", "buildset_id")}


def _build_row(row: sa.Row) -> dict[str, Any]:
    data = _public(row._asdict())
    buildset = {
        "uuid": data.pop("buildset_uuid"),
        "result": data.pop("buildset_result"),
    }
    return {**data, "buildset": buildset}
