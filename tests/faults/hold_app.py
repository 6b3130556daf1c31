"""The app of the shutdown, skew and crash-consistency tests' worker processes
(``faults.hold_app:app``; URL from ``TASKMILL_URL``, ledger from ``FAULTS_LEDGER``).

``faults.hold(seconds)`` records the start of its execution in the ledger, sleeps, then records
the end (a process that exits or is killed mid-sleep leaves the end empty). A process started
with ``FAULTS_HOLD_CAP_S`` caps every sleep at that many seconds: the worker that takes over
a released 60 s job finishes it at once, so a test need not wait a minute to see it done.
"""

from __future__ import annotations

import os
import time

from faults.ledger import Ledger
from taskmill import App, current_job

CAP_ENV = "FAULTS_HOLD_CAP_S"

app = App(os.environ.get("TASKMILL_URL", "memory://"))

_ledger: Ledger | None = None


def ledger() -> Ledger:
    global _ledger
    if _ledger is None:
        _ledger = Ledger.from_env()
    return _ledger


@app.task(name="faults.hold", retries=3, backoff=0.05)
def hold(seconds: float) -> None:
    job = current_job()
    seq = ledger().start_execution(job.id, job.attempt)
    cap = float(os.environ.get(CAP_ENV, "inf"))
    time.sleep(min(seconds, cap))  # the job's work: still running when the signal comes
    ledger().end_execution(seq)
