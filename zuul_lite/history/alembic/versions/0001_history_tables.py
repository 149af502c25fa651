"""The build set and build tables.

Revision ID: 0001
Revises:
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "zuul_buildset",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("uuid", sa.String(36), nullable=False, unique=True),
        sa.Column("item_uuid", sa.String(36), nullable=False),
        sa.Column("event_id", sa.String(255)),
        sa.Column("pipeline", sa.String(255), nullable=False, index=True),
        sa.Column("connection", sa.String(255), nullable=False),
        sa.Column("project", sa.String(255), nullable=False, index=True),
        sa.Column("branch", sa.String(255), nullable=False),
        sa.Column("change", sa.Integer, nullable=False, index=True),
        sa.Column("patchset", sa.Integer, nullable=False),
        sa.Column("ref", sa.String(255)),
        sa.Column("newrev", sa.String(40)),
        sa.Column("subject", sa.Text),
        sa.Column("owner", sa.String(255)),
        sa.Column("change_url", sa.Text),
        sa.Column("changes", sa.Text),
        sa.Column("result", sa.String(32), nullable=False, index=True),
        sa.Column("message", sa.Text),
        sa.Column("merged", sa.Boolean, nullable=False),
        sa.Column("enqueue_time", sa.Float),
        sa.Column("first_build_start_time", sa.Float),
        sa.Column("last_build_end_time", sa.Float),
        sa.Column("report_time", sa.Float, index=True),
    )
    op.create_table(
        "zuul_build",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "buildset_id",
            sa.Integer,
            sa.ForeignKey("zuul_buildset.id", ondelete="CASCADE"),
            nullable=False,
            index=True,
        ),
        sa.Column("uuid", sa.String(36), nullable=False, unique=True),
        sa.Column("job_name", sa.String(255), nullable=False, index=True),
        sa.Column("node_type", sa.String(255)),
        sa.Column("result", sa.String(32), index=True),
        sa.Column("start_time", sa.Float),
        sa.Column("end_time", sa.Float, index=True),
        sa.Column("elapsed", sa.Float),
        sa.Column("log_url", sa.Text),
        sa.Column("log_path", sa.Text),
        sa.Column("summary", sa.Text),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("zuul_build")
    op.drop_table("zuul_buildset")
