"""Closing at interpreter exit: ``atexit.register(app.close)``, and a worker thread still
running (stopped by an ``atexit`` hook, draining its job).

``concurrent.futures`` refuses new work in every thread pool once its own exit hook ran, which
is before ``atexit`` hooks: anything that closing or draining submits to one fails there. Each
case runs a real interpreter to its end, in a subprocess, on each broker that runs blocking
calls on threads of its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from servers import NatsServer, PostgresServer, RedisServer
from taskmill import App, JobState

from .support import all_jobs

SEND_THEN_EXIT = """
import atexit, sys
from taskmill import App

app = App(sys.argv[1])

@app.task(name="double")
def double(x: int) -> int:
    return 2 * x

atexit.register(app.close)
print(double.send(21).id)
"""

EXIT_WHILE_A_WORKER_THREAD_RUNS = """
import atexit, sys, threading, time
from taskmill import App

app = App(sys.argv[1])
started = threading.Event()

@app.task(name="slow")
def slow(x: int) -> int:
    started.set()
    time.sleep(0.5)
    return 2 * x

app.on_success(lambda job, result: print("on_success", result, flush=True))
worker = app.worker_thread(concurrency=2).start()
atexit.register(app.close)
atexit.register(worker.stop)  # runs first: drains the job, then the App closes
print(slow.send(21).id, flush=True)
assert started.wait(20), "the job never started"
"""


def run_script(tmp_path: Path, script: str, url: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKMILL_")}
    return subprocess.run(
        [sys.executable, "-c", script, url],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=30,  # a drain that cannot write its outcomes retries for ever
    )


@pytest.fixture(params=["sqlite", "postgres", "redis", "nats"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    kind = request.param
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    if kind == "postgres":
        postgres: PostgresServer = request.getfixturevalue("postgres_server")
        return postgres.create_database(f"exit_{uuid.uuid4().hex[:12]}")
    if kind == "nats":
        nats: NatsServer = request.getfixturevalue("nats_server")
        return f"{nats.url}?prefix=exit{uuid.uuid4().hex[:12]}"
    redis: RedisServer = request.getfixturevalue("redis_server")
    return f"{redis.url}?prefix=exit-{uuid.uuid4().hex[:12]}"


def job_of(url: str, job_id: str) -> tuple[JobState, bytes | None]:
    with App(url) as app:
        job = all_jobs(app)[job_id]
    return job.state, job.result


@pytest.mark.timeout(60)
def test_closing_the_app_from_an_atexit_hook_works(tmp_path: Path, url: str) -> None:
    proc = run_script(tmp_path, SEND_THEN_EXIT, url)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert job_of(url, proc.stdout.strip()) == (JobState.QUEUED, None)


@pytest.mark.timeout(60)
def test_a_worker_thread_stopped_at_exit_drains_its_job(tmp_path: Path, url: str) -> None:
    proc = run_script(tmp_path, EXIT_WHILE_A_WORKER_THREAD_RUNS, url)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    job_id, hooked = proc.stdout.split()[0], proc.stdout.splitlines()[1:]
    assert hooked == ["on_success 42"]  # its sync hook ran at exit too
    assert job_of(url, job_id) == (JobState.SUCCEEDED, b"42")
