"""The app that ``taskmill worker`` processes load in the partition test (``partition_app:app``).

The URL comes from ``TASKMILL_URL``; the lease from ``taskmill worker --lease``. ``hold`` marks
each execution with a file in ``$T08_GATE`` (``ran-JOB-ATTEMPT-PID``), then blocks until the test
creates ``release-PID`` for its worker process, marks ``done-JOB-ATTEMPT-PID`` and returns ``n``.
So the test decides which worker's runs end, and when.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from taskmill import App, current_job

GATE_ENV = "T08_GATE"
HOLD_LIMIT_S = 120.0
"""A run never blocks longer than this (a thread left behind by a lost lease ends too)."""

app = App(os.environ.get("TASKMILL_URL", "memory://"))


@app.task(name="hold", retries=0)
def hold(n: int) -> int:
    gate = Path(os.environ[GATE_ENV])
    job = current_job()
    mark = f"{job.id}-{job.attempt}-{os.getpid()}"
    (gate / f"ran-{mark}").touch()
    release = gate / f"release-{os.getpid()}"
    deadline = time.monotonic() + HOLD_LIMIT_S
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    (gate / f"done-{mark}").touch()
    return n
