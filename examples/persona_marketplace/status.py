"""The app's own table of ingestion jobs, the rows its API shows (the seed's ``IngestionJob``).

Only the hooks of ``tasks.py`` write it, each event in one statement keyed by the taskmill job
id; the web app only reads it. A row says what the app wants to show of an ingestion
(its persona and source, status, attempts, vectors, last error); taskmill's own record of the
job (state, lease, traceback) is a lookup away by the same id.

Hooks run at least once per event (a worker killed between a hook and the outcome write runs
the job and its hooks again), so every write is an upsert that is right when repeated.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS ingestion_jobs (
    job_id     TEXT PRIMARY KEY,
    persona_id TEXT NOT NULL,
    source     TEXT NOT NULL,
    status     TEXT NOT NULL,  -- pending, processing, retrying, completed, failed
    attempt    INTEGER NOT NULL DEFAULT 0,
    retries    INTEGER NOT NULL DEFAULT 0,
    vectors    INTEGER,
    error      TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS ingestion_jobs_persona ON ingestion_jobs (persona_id, created_at);
"""

_UPSERT = """
INSERT INTO ingestion_jobs
    (job_id, persona_id, source, status, attempt, retries, vectors, error, created_at, updated_at)
VALUES (:job_id, :persona_id, :source, :status, :attempt, :retried, :vectors, :error, :now, :now)
ON CONFLICT (job_id) DO UPDATE SET
    status = :status,
    attempt = :attempt,
    retries = retries + :retried,
    vectors = :vectors,
    error = CASE WHEN :status = 'processing' THEN error ELSE :error END,
    updated_at = :now
WHERE :status != 'pending'
"""
"""A ``pending`` write never overrides what a worker wrote already (the hook that enqueued a
workflow step may run after a worker started it); the others are each the latest news. A
``processing`` row keeps the last attempt's error, so a retry in flight still says why."""


class StatusTable:
    """The table in one SQLite file, opened per call: hooks run on worker threads and in
    several processes, and a short connection keeps no lock between events."""

    def __init__(self, path: str) -> None:
        self.path = path

    def create(self) -> None:
        with self._connect() as db:
            db.executescript(SCHEMA)

    def record(
        self,
        job_id: str,
        persona_id: str,
        source: str,
        status: str,
        *,
        attempt: int = 0,
        retried: bool = False,
        vectors: int | None = None,
        error: str | None = None,
    ) -> None:
        """Write one event of a job's life (see the module's docstring)."""
        row = {
            "job_id": job_id,
            "persona_id": persona_id,
            "source": source,
            "status": status,
            "attempt": attempt,
            "retried": int(retried),
            "vectors": vectors,
            "error": error,
            "now": time.time(),
        }
        with self._connect() as db:
            db.execute(_UPSERT, row)

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM ingestion_jobs WHERE job_id = ?", (job_id,)).fetchone()
        return dict(row) if row is not None else None

    def latest_for(self, persona_id: str) -> list[dict[str, Any]]:
        """The newest row of each of the persona's sources."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT * FROM ingestion_jobs WHERE persona_id = ? ORDER BY created_at, rowid",
                (persona_id,),
            ).fetchall()
        latest = {row["source"]: dict(row) for row in rows}
        return sorted(latest.values(), key=lambda r: r["source"])

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=10)
        try:
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            with db:  # one transaction: commit, or roll back on error
                yield db
        finally:
            db.close()


def persona_status(rows: list[dict[str, Any]]) -> str:
    """The persona's state, from its sources' rows: ``draft`` (never ingested), ``failed``
    (a source failed), ``active`` (every source completed), else ``ingesting``."""
    if not rows:
        return "draft"
    statuses = {row["status"] for row in rows}
    if "failed" in statuses:
        return "failed"
    if statuses == {"completed"}:
        return "active"
    return "ingesting"
