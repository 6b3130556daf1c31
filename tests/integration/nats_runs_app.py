"""The app of the NATS tests' worker processes (``nats_runs_app:app``): each run of ``note``
appends its job id to the file ``RUNS_FILE`` names, so a test counts how often each job ran
across processes; ``hold`` runs until the file ``RELEASE_FILE`` names exists."""

from __future__ import annotations

import os
import time
from pathlib import Path

from taskmill import App, current_job

SETTINGS = {"lease_s": 2.0, "heartbeat_s": 0.2, "recover_interval_s": 0.2}

app = App(os.environ.get("TASKMILL_URL", "memory://"), **SETTINGS)


def _note_run() -> None:
    with open(os.environ["RUNS_FILE"], "a") as f:  # O_APPEND: whole lines from each process
        f.write(f"{current_job().id} {os.getpid()}\n")


@app.task(name="note", retries=5, backoff=0.05)
def note(n: int, pause_s: float = 0.0) -> int:
    _note_run()
    if pause_s:
        time.sleep(pause_s)
    return n


@app.task(name="hold", retries=3, backoff=0.05)
def hold() -> int:
    _note_run()
    release = Path(os.environ["RELEASE_FILE"])
    while not release.exists():
        time.sleep(0.02)  # a poll of the file the test creates: the job's own work
    return os.getpid()
