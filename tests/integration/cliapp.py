"""A small app for the CLI tests. The broker URL comes from ``TASKMILL_URL`` (a SQLite file in
each test's tmp_path); task names are explicit so they do not depend on how this module is
imported."""

from __future__ import annotations

import logging
import os
import time

from taskmill import App, Backoff, current_job

app = App(os.environ.get("TASKMILL_URL", "memory://"), heartbeat_s=0.5)


@app.task(name="add")
def add(a: int, b: int) -> int:
    return a + b


@app.task(name="steps", queue="urgent", priority=5)
def steps(n: int, pause_s: float = 0.01) -> str:
    job = current_job()
    for i in range(n):
        time.sleep(pause_s)
        job.progress((i + 1) / n, f"step {i + 1} of {n}")
    return f"did {n} steps"


@app.task(name="boom", retries=0)
def boom(message: str) -> None:
    raise ValueError(message)


@app.task(name="flaky", retries=2, backoff=Backoff(base=0.05, cap=0.1))
def flaky(fail_times: int) -> int:
    attempt = current_job().attempt
    if attempt <= fail_times:
        raise RuntimeError(f"attempt {attempt} fails on purpose")
    return attempt


@app.task(name="block", retries=0)
def block(path: str, limit_s: float = 30.0) -> str:
    """Runs until ``path`` exists or the job is cancelled (a test's handle on a running job)."""
    job = current_job()
    deadline = time.monotonic() + limit_s
    while not os.path.exists(path) and time.monotonic() < deadline:
        if job.cancelled:
            return "cancelled"
        time.sleep(0.01)
    return "released"


# an app of its own for the schedules tests: the other tests' workers must not schedule
scheduled = App(os.environ.get("TASKMILL_URL", "memory://"), heartbeat_s=0.5)


@scheduled.periodic(every=1.0, name="every-second")
@scheduled.periodic(cron="0 2 * * *", tz="Europe/Paris", name="nightly")
@scheduled.task(name="tick")
def tick() -> str:
    return "tick"


# an app that publishes live events (taskmill jobs watch, enqueue --wait follow them)
live = App(os.environ.get("TASKMILL_URL", "memory://"), heartbeat_s=0.5, events=True)


@live.task(name="live_steps")
def live_steps(n: int) -> str:
    job = current_job()
    for i in range(n):
        job.progress((i + 1) / n, f"step {i + 1} of {n}")
        time.sleep(0.05)
    return f"did {n} steps"


@app.task(name="chatty", retries=0)
def chatty(word: str) -> str:
    logging.getLogger("cliapp.chatty").info("the task says %s", word)
    return word
