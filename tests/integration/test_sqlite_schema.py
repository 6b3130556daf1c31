"""The SQLite file's schema: a file made by an older taskmill (schema 4) is upgraded on first
use to what a fresh file gets, and keeps its jobs."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from taskmill import App, JobState
from taskmill.brokers import sqlite as sqlite_broker


def catalog(db: Path) -> dict[str, Any]:
    conn = sqlite3.connect(db)
    try:
        objects = conn.execute(
            "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name"
        ).fetchall()
        columns = {
            name: conn.execute(f"PRAGMA table_info({name})").fetchall()
            for kind, name, _table, _sql in objects
            if kind == "table"
        }
        (version,) = conn.execute("PRAGMA user_version").fetchone()
    finally:
        conn.close()
    return {"objects": objects, "columns": columns, "version": version}


def make_version_4(db: Path) -> None:
    """A file as taskmill left it at schema version 4, with one job in it."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        script = "\n".join(
            line for line in sqlite_broker.Q["schema_v1"].splitlines() if not line.startswith("--")
        )
        conn.executescript(script)
        conn.execute("PRAGMA user_version = 4")
        conn.execute(
            "INSERT INTO taskmill_jobs (id, task, queue, state, payload, run_at, enqueued_at) "
            "VALUES ('old-job', 'work', 'default', 'queued', ?, 1.0, 1.0)",
            (b"[[1],{}]",),
        )
    finally:
        conn.close()


def test_a_version_4_file_is_upgraded_to_a_fresh_files_schema_and_keeps_its_jobs(
    tmp_path: Path,
) -> None:
    old, fresh = tmp_path / "old.db", tmp_path / "fresh.db"
    make_version_4(old)
    assert "meta" not in {c[1] for c in catalog(old)["columns"]["taskmill_jobs"]}
    for db in (old, fresh):
        app = App(f"sqlite:///{db}")
        try:
            app.open()
            if db == old:
                job = app.get_job("old-job")
                assert job.state is JobState.QUEUED and job.meta == {}
                assert [j.id for j in app.list_jobs(meta={}).jobs] == ["old-job"]
        finally:
            app.close()
    upgraded, made = catalog(old), catalog(fresh)
    assert upgraded["version"] == made["version"] == sqlite_broker.SCHEMA_VERSION
    assert upgraded == made


def test_an_upgraded_file_counts_the_jobs_it_had(tmp_path: Path) -> None:
    """Version 6 keeps counts of scheduled and finished jobs: the upgrade counts those a file
    holds already, and the counts go on from there."""
    db = tmp_path / "old.db"
    make_version_4(db)
    stored = {"default": ("succeeded", "failed", "scheduled"), "mail": ("succeeded", "cancelled")}
    rows = [
        (f"{queue}-{state}-{n}", queue, state, None if state == "scheduled" else 2.0)
        for queue, states in stored.items()
        for state in states
        for n in range(3 if queue == "default" else 2)
    ]
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.executemany(
            "INSERT INTO taskmill_jobs (id, task, queue, state, payload, run_at, enqueued_at, "
            "finished_at) VALUES (?, 'work', ?, ?, x'5b5d', 1.0, 1.0, ?)",
            rows,
        )
    finally:
        conn.close()
    app = App(f"sqlite:///{db}")
    try:
        app.open()
        counts = {s.queue: {k: v for k, v in s.counts.items() if v} for s in app.stats()}
        assert counts == {
            "default": {"queued": 1, "scheduled": 3, "succeeded": 3, "failed": 3},
            "mail": {"succeeded": 2, "cancelled": 2},
        }
        assert app.list_jobs(state="failed", queue="default").total == 3
        assert len(app.delete_jobs(queue="mail")) == 4
        assert app.list_jobs(state=["succeeded", "cancelled", "failed"]).total == 6
    finally:
        app.close()
