"""Alembic's environment for the history database.

`HistoryDB.upgrade` passes its open connection in `config.attributes`, so
migrations run in-process on the scheduler's engine (doc/web.md).
"""

from __future__ import annotations

from alembic import context

from zuul_lite.history.schema import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata)
with context.begin_transaction():
    context.run_migrations()
