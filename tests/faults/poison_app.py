"""The app of the poison tests' worker processes (``faults.poison_app:app``; URL from
``TASKMILL_URL``, ledger from ``FAULTS_LEDGER``).

``poison.good`` is the well-behaved job whose throughput the tests measure; the others are
poison: they crash their process (T10), always raise (T11) or never return (T23), and record
each execution in the ledger first, so a test counts how many times each ran. ``register``
declares them on any app: a test's producer sends with the same options (retries, back-off,
time limit) as the workers run them with.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

from faults.ledger import Ledger
from taskmill import App, Backoff, current_job
from taskmill.task import Task

MAX_PAYLOAD_BYTES = 256 * 1024
"""The plan's proposed default (256 KiB): small enough that an oversize record fits in one NATS
message (1 MB), large enough for the 100,000-deep nesting record (200 KB)."""
RAISE_RETRIES = 3
RAISE_BACKOFF = Backoff(base=0.4, factor=2.0, cap=10.0, jitter=True)
"""T11's policy: after attempt n a delay of half to all of 0.4 x 2^(n-1) s: 0.2-0.4, 0.4-0.8,
0.8-1.6 s."""
HANG_RETRIES = 1
HANG_TIMEOUT_S = 2.0

_ledger: Ledger | None = None


def ledger() -> Ledger:
    global _ledger
    if _ledger is None:
        _ledger = Ledger.from_env()
    return _ledger


def good(pause_ms: int) -> int:
    time.sleep(pause_ms / 1000)  # the job's work
    return pause_ms


def echo(text: str) -> str:
    return text


def crash(how: str) -> None:
    """Kill this job's own worker process: ``exit`` (``os._exit(1)``) or ``kill`` (SIGKILL)."""
    job = current_job()
    ledger().start_execution(job.id, job.attempt)
    if how == "exit":
        os._exit(1)
    os.kill(os.getpid(), signal.SIGKILL)


def raises(n: int) -> None:
    job = current_job()
    ledger().start_execution(job.id, job.attempt)
    raise ValueError(f"poison {n}: this job always raises")


def note_retry(job: Any, error: Any, delay: float) -> None:
    """``poison.raises``' ``on_retry`` hook: when its retry is due (T11 checks the schedule)."""
    ledger().record_retry(job.id, job.attempt, delay)


def hang(n: int) -> None:
    """Block for ever, deaf to cancellation (``current_job().cancelled`` is never read)."""
    job = current_job()
    ledger().start_execution(job.id, job.attempt)
    threading.Event().wait()


def register(app: App) -> dict[str, Task[..., Any]]:
    """Declare the poison tasks on ``app``; its tasks by name."""
    tasks = [
        app.task(name="poison.good", retries=0)(good),
        app.task(name="poison.echo", retries=0)(echo),
        app.task(name="poison.crash", retries=10, backoff=0.05)(crash),
        app.task(
            name="poison.raises",
            retries=RAISE_RETRIES,
            backoff=RAISE_BACKOFF,
            on_retry=note_retry,
        )(raises),
        app.task(name="poison.hang", retries=HANG_RETRIES, backoff=0.1, timeout=HANG_TIMEOUT_S)(
            hang
        ),
    ]
    return {t.name: t for t in tasks}


app = App(os.environ.get("TASKMILL_URL", "memory://"), max_payload_bytes=MAX_PAYLOAD_BYTES)
register(app)
