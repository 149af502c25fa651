"""Alembic's environment for the history database.

`HistoryDB.upgrade` passes its open connection in `config.attributes`, so
migrations run in-process on the scheduler's engine; the `alembic` command
line works too, given `-x dburi=<url>` (see doc/web.md).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from zuul_lite.history.schema import metadata

config = context.config


def run_migrations() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=metadata)
        with context.begin_transaction():
            context.run_migrations()
        return
    dburi = context.get_x_argument(as_dictionary=True).get("dburi")
    engine = sa.create_engine(dburi)
    with engine.begin() as conn:
        context.configure(connection=conn, target_metadata=metadata)
        with context.begin_transaction():
            context.run_migrations()


run_migrations()
