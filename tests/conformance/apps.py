"""Apps with importable tasks, for tests that run workers or producers in other processes.

A test builds the same app in-process with ``build_app(url, **settings)``; a subprocess loads
``apps:app``, built from ``TASKMILL_URL`` and the JSON settings in ``CONFORMANCE_APP_SETTINGS``.
Tasks have explicit names so both sides agree whatever this package is imported as.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from taskmill import App, current_job

SETTINGS_ENV = "CONFORMANCE_APP_SETTINGS"
PERIODIC_ENV = "CONFORMANCE_PERIODIC"


def _touch(marker: str) -> None:
    Path(marker).write_text(f"{os.getpid()} {current_job().attempt}")


def build_app(url: str | None = None, **settings: Any) -> App:
    app = App(url, **settings)

    @app.task(name="conformance.hang_first_attempt", retries=2, backoff=0)
    def hang_first_attempt(marker: str) -> int:
        """Attempt 1 marks that it started and hangs (to be killed); later attempts return."""
        attempt = current_job().attempt
        if attempt == 1:
            _touch(marker)
            time.sleep(60)
        return attempt

    @app.task(name="conformance.slow", retries=0)
    def slow(marker: str, seconds: float) -> str:
        _touch(marker)
        time.sleep(seconds)
        return "done"

    @app.task(name="conformance.until_cancelled", retries=0)
    def until_cancelled(marker: str) -> str:
        """A cooperative sync task: runs until the worker asks it to stop."""
        _touch(marker)
        job = current_job()
        deadline = time.monotonic() + 60
        while not job.cancelled and time.monotonic() < deadline:
            time.sleep(0.01)
        return "stopped" if job.cancelled else "ran out"

    @app.task(name="conformance.exit_process", retries=0)
    async def exit_process() -> None:
        """Ends the worker process that runs it at once, as a crashing library would."""
        os._exit(1)

    @app.task(name="conformance.async_double", retries=0)
    async def async_double(x: int) -> int:
        return 2 * x

    @app.task(name="conformance.async_forever", retries=0)
    async def async_forever(marker: str) -> str:
        _touch(marker)
        await asyncio.sleep(60)
        return "ran out"

    @app.task(name="conformance.record", retries=0)
    def record(db: str, n: int) -> int:
        """Count executions in a table of their own (not the broker's)."""
        conn = sqlite3.connect(db, timeout=30)
        try:
            with conn:
                conn.execute(
                    "INSERT INTO executions (job_id, n, pid) VALUES (?, ?, ?)",
                    (current_job().id, n, os.getpid()),
                )
        finally:
            conn.close()
        return n

    @app.task(name="conformance.double", retries=0)
    def double(x: int) -> int:
        return 2 * x

    @app.task(name="conformance.echo_list", retries=0)
    def echo_list(values: list[int]) -> list[list[int]]:
        return [values]

    @app.task(name="conformance.rate_limited", retries=0, rate_limit="50/s")
    def rate_limited(db: str) -> None:
        """Record when it started (the rate limit's subject), in a table of its own."""
        started = time.time()
        conn = sqlite3.connect(db, timeout=30)
        try:
            with conn:
                conn.execute("INSERT INTO starts (at, pid) VALUES (?, ?)", (started, os.getpid()))
        finally:
            conn.close()

    @app.task(name="conformance.tick", retries=0)
    def tick() -> None:
        return None

    if os.environ.get(PERIODIC_ENV):  # only the periodic test's processes schedule it
        app.periodic(every=1.0, name="every-second")(tick)

    return app


def create_executions_table(db: Path) -> None:
    conn = sqlite3.connect(db)
    try:
        with conn:
            conn.execute("CREATE TABLE executions (job_id TEXT NOT NULL, n INTEGER, pid INTEGER)")
    finally:
        conn.close()


def create_starts_table(db: Path) -> None:
    conn = sqlite3.connect(db)
    try:
        with conn:
            conn.execute("CREATE TABLE starts (at REAL NOT NULL, pid INTEGER)")
    finally:
        conn.close()


def starts(db: Path) -> list[tuple[float, int]]:
    conn = sqlite3.connect(db, timeout=30)
    try:
        return conn.execute("SELECT at, pid FROM starts ORDER BY at").fetchall()
    finally:
        conn.close()


def executions(db: Path) -> list[tuple[str, int, int]]:
    conn = sqlite3.connect(db, timeout=30)
    try:
        return conn.execute("SELECT job_id, n, pid FROM executions").fetchall()
    finally:
        conn.close()


# What subprocesses load (``apps:app``). Building an App does no I/O.
app = build_app(**json.loads(os.environ.get(SETTINGS_ENV) or "{}"))
