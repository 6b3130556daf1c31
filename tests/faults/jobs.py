"""The app of the fault tests' worker processes (``jobs:app``, on ``PYTHONPATH``): its URL comes
from ``TASKMILL_URL`` and its ledger from ``FAULTS_LEDGER``. ``work`` records each execution in
the ledger (start before the body, end after it), so the checker sees every run, also the ones
a kill cut short."""

from __future__ import annotations

import os
import time

from faults.ledger import Ledger
from taskmill import App, current_job

app = App(os.environ.get("TASKMILL_URL", "memory://"))

_ledger: Ledger | None = None


def ledger() -> Ledger:
    global _ledger
    if _ledger is None:
        _ledger = Ledger.from_env()
    return _ledger


@app.task(name="faults.work", retries=10, backoff=0.05)
def work(pause_ms: int) -> None:
    job = current_job()
    seq = ledger().start_execution(job.id, job.attempt)
    time.sleep(pause_ms / 1000)  # the job's work: in flight when a kill lands
    ledger().end_execution(seq)


GATE_ENV = "FAULTS_GATE"
"""The directory ``gated`` watches for its release files."""
GATED_LIMIT_S = 120.0
"""A ``gated`` run never waits longer than this (a thread left behind ends too)."""


@app.task(name="faults.gated", retries=10, backoff=0.05)
def gated() -> None:
    """Records its start, waits until ``$FAULTS_GATE/release-PPID`` exists (PPID: the
    supervisor of this worker process, so the test releases one supervisor's runs at a time),
    then records its end."""
    job = current_job()
    seq = ledger().start_execution(job.id, job.attempt)
    release = os.path.join(os.environ[GATE_ENV], f"release-{os.getppid()}")
    deadline = time.monotonic() + GATED_LIMIT_S
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.02)  # the test's gate: polled, as a job body would poll its own work
    ledger().end_execution(seq)
