"""The history tables, in Zuul's shape (zuul_buildset, zuul_build).

Times are epoch seconds (floats), as everywhere else in zuul-lite, so the
same numbers come out of SQLite and PostgreSQL. A change of these tables
needs a new migration under `alembic/versions/`.
"""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

buildset_table = Table(
    "zuul_buildset",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("uuid", String(36), nullable=False, unique=True),
    Column("item_uuid", String(36), nullable=False),
    Column("event_id", String(255)),
    Column("pipeline", String(255), nullable=False, index=True),
    Column("connection", String(255), nullable=False),
    Column("project", String(255), nullable=False, index=True),
    Column("branch", String(255), nullable=False),
    Column("change", Integer, nullable=False, index=True),  # 0: a branch head
    Column("patchset", Integer, nullable=False),
    Column("ref", String(255)),
    Column("newrev", String(40)),
    Column("subject", Text),
    Column("owner", String(255)),
    Column("change_url", Text),
    Column("changes", Text),  # the labels applied, in order: "3,1 4,2"
    Column("result", String(32), nullable=False, index=True),
    Column("message", Text),
    Column("merged", Boolean, nullable=False, default=False),
    Column("enqueue_time", Float),
    Column("first_build_start_time", Float),
    Column("last_build_end_time", Float),
    Column("report_time", Float, index=True),
)

build_table = Table(
    "zuul_build",
    metadata,
    Column("id", Integer, primary_key=True),
    Column(
        "buildset_id",
        Integer,
        ForeignKey("zuul_buildset.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    Column("uuid", String(36), nullable=False, unique=True),
    Column("job_name", String(255), nullable=False, index=True),
    Column("node_type", String(255)),
    Column("result", String(32), index=True),
    Column("start_time", Float),
    Column("end_time", Float, index=True),
    Column("elapsed", Float),
    Column("log_url", Text),
    Column("log_path", Text),
    Column("summary", Text),
    Column("attempts", Integer, nullable=False, default=0),
    Column("position", Integer, nullable=False, default=0),  # the job's place in the layout
)

# What a trusted build of a job found on a branch head (zuul_lite/baseline.py):
# one row per project, commit and job, the newest build's.
baseline_table = Table(
    "zuul_baseline",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("project", String(255), nullable=False),
    Column("sha", String(40), nullable=False),
    Column("job_name", String(255), nullable=False),
    Column("build_uuid", String(36), nullable=False),
    Column("log_url", Text),
    Column("findings", Text, nullable=False),  # Findings.to_dict() as JSON
    Column("record_time", Float, nullable=False),
    UniqueConstraint("project", "sha", "job_name", name="zuul_baseline_key"),
)
