"""The SQLite file's schema: the named queries of ``sql/sqlite.sql``, the schema's version and
the upgrade that brings an older file to it."""

from __future__ import annotations

import sqlite3

from taskmill.brokers._rows import JOB_COLUMNS
from taskmill.brokers._sql import load_queries

Q = load_queries("sqlite.sql")
SCHEMA_VERSION = 5
"""2: schedules, 3: workflows and limits, 4: events (versions 1-4 are ``schema_v1``, all IF NOT
EXISTS); 5: job metadata and workers' counters (``schema_v5``, columns added to version 4)."""
COLUMNS = ", ".join(JOB_COLUMNS)
"""What a query selects to make a ``Job`` of a row (``_rows.job_from_row``)."""


def upgrade(conn: sqlite3.Connection) -> None:
    """Bring the schema to ``SCHEMA_VERSION``: what a fresh file gets is what an old one
    gets, step by step. The version is read again under the write lock: another process
    may have upgraded the file since."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        steps = [(4, "schema_v1"), (5, "schema_v5")]
        for target, name in steps:
            if version < target:
                script = "\n".join(
                    line for line in Q[name].splitlines() if not line.startswith("--")
                )
                for statement in script.split(";"):
                    if statement.strip():
                        conn.execute(statement)
        if version < SCHEMA_VERSION:
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
