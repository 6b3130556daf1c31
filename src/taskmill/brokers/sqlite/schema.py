"""The SQLite file's schema: the named queries of ``sql/sqlite.sql``, the schema's version and
the upgrade that brings an older file to it."""

from __future__ import annotations

import sqlite3

from taskmill.brokers._rows import JOB_COLUMNS
from taskmill.brokers._sql import load_queries

Q = load_queries("sqlite.sql")
SCHEMA_VERSION = 7
"""2: schedules, 3: workflows and limits, 4: events (versions 1-4 are ``schema_v1``, all IF NOT
EXISTS); 5: job metadata and workers' counters (``schema_v5``, columns added to version 4);
6: counts of scheduled and finished jobs per queue, kept by triggers (``schema_v6``); 7: long
payloads in a table of their own (``schema_v7``)."""
PAYLOAD_APART_BYTES = 2048
"""A payload longer than this is stored in ``taskmill_payloads``, written once, its job's row
keeping an empty one: SQLite writes a row whole at each update, and a row of a few pages costs
that many page writes each time. Shorter ones stay in the row, one read fewer for most jobs."""
COUNTED_STATES = ("scheduled", "succeeded", "failed", "cancelled")
"""The states ``taskmill_counts`` counts; queued and running jobs are counted on their
partial indexes."""
PAYLOAD = (
    "CASE WHEN payload = x'' THEN (SELECT payload FROM taskmill_payloads"
    " WHERE taskmill_payloads.seq = taskmill_jobs.seq) ELSE payload END"
)
"""A job's payload, where it is stored (a correlated subquery: also in an UPDATE's RETURNING)."""
COLUMNS = ", ".join(PAYLOAD if col == "payload" else col for col in JOB_COLUMNS)
"""What a query selects to make a ``Job`` of a row (``_rows.job_from_row``)."""


def upgrade(conn: sqlite3.Connection) -> None:
    """Bring the schema to ``SCHEMA_VERSION``: what a fresh file gets is what an old one
    gets, step by step. The version is read again under the write lock: another process
    may have upgraded the file since."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        steps = [(4, "schema_v1"), (5, "schema_v5"), (6, "schema_v6"), (7, "schema_v7")]
        for target, name in steps:
            if version < target:
                for statement in _statements(Q[name]):
                    conn.execute(statement)
        if version < SCHEMA_VERSION:
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _statements(script: str) -> list[str]:
    """The statements of a script, each whole: a trigger's body holds semicolons of its own
    (``executescript`` would do the split, but it commits the transaction first)."""
    script = "\n".join(line for line in script.splitlines() if not line.startswith("--"))
    statements: list[str] = []
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                statements.append(pending)
            pending = ""
    return statements
