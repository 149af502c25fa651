"""Build history in SQL: every reported build set and its builds.

`schema` declares the tables, `alembic/` migrates a database to them (the
scheduler runs `alembic upgrade head` at start), `db.HistoryDB` writes and
queries them, and `records` turns a finished queue item into rows. The
scheduler writes; the web only reads.
"""
