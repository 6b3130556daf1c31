"""The app that ``taskmill worker`` processes load in the PostgreSQL tests (``postgres_app:app``).

The URL comes from ``TASKMILL_URL`` (a test's own database, or its own server). Leases are short
so a job whose worker lost it comes back within seconds; task names are explicit so the test's
in-process app and the workers agree on them. ``record`` counts executions in a table of the
same database (``public.executions``), outside taskmill's schema.
"""

from __future__ import annotations

import os
import time

import psycopg

from taskmill import App, current_job

SETTINGS = {"lease_s": 3.0, "heartbeat_s": 0.3, "recover_interval_s": 0.3}
EXECUTIONS_URL_ENV = "EXECUTIONS_URL"

app = App(os.environ.get("TASKMILL_URL", "memory://"), **SETTINGS)


@app.task(name="work", retries=5, backoff=0.05)
def work(n: int, pause_s: float = 0.0) -> int:
    if pause_s:
        time.sleep(pause_s)
    return n


@app.task(name="record", retries=0)
def record(n: int, pause_s: float = 0.0) -> int:
    """Insert (job id, attempt, pid) into ``public.executions``, then take ``pause_s``."""
    job = current_job()
    with psycopg.connect(os.environ[EXECUTIONS_URL_ENV], autocommit=True) as conn:
        conn.execute(
            "INSERT INTO public.executions (job_id, attempt, pid) VALUES (%s, %s, %s)",
            (job.id, job.attempt, os.getpid()),
        )
    if pause_s:
        time.sleep(pause_s)
    return n
