"""The baseline table: a trusted build's findings per project, commit and job.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "zuul_baseline",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("project", sa.String(255), nullable=False),
        sa.Column("sha", sa.String(40), nullable=False),
        sa.Column("job_name", sa.String(255), nullable=False),
        sa.Column("build_uuid", sa.String(36), nullable=False),
        sa.Column("log_url", sa.Text),
        sa.Column("findings", sa.Text, nullable=False),
        sa.Column("record_time", sa.Float, nullable=False),
        sa.UniqueConstraint("project", "sha", "job_name", name="zuul_baseline_key"),
    )


def downgrade() -> None:
    op.drop_table("zuul_baseline")
