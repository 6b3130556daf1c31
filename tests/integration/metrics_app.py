"""The app the worker-metrics tests run (``metrics_app:app``); its URL comes from
``TASKMILL_URL``. Task names are explicit so the test's app and the workers agree."""

from __future__ import annotations

import os
import time

from taskmill import App, Backoff, current_job

app = App(os.environ.get("TASKMILL_URL", "memory://"), heartbeat_s=0.3, lease_s=3.0)


@app.task(name="meter.ok")
def ok(n: int) -> int:
    return n


@app.task(name="meter.bad", queue="slow", retries=0)
def bad() -> None:
    raise ValueError("fails on purpose")


@app.task(name="meter.flaky", retries=1, backoff=Backoff(base=0.05, cap=0.05))
def flaky() -> int:
    attempt = current_job().attempt
    if attempt == 1:
        raise RuntimeError("the first attempt fails on purpose")
    return attempt


@app.task(name="meter.fanout")
def fanout(k: int) -> None:
    """Sends ``k`` jobs from inside the worker: its enqueue pipeline counts them."""
    ok.send_many([(i,) for i in range(k)])


@app.task(name="meter.hold", retries=0)
def hold(path: str) -> str:
    """Runs until ``path`` exists: two of them on ``-c 1`` workers occupy both processes."""
    deadline = time.monotonic() + 30
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return "released"
