"""Procrastinate's side of bench.compare_postgres (run with its virtualenv's python).

The app: ``App(connector=PsycopgConnector(conninfo=...))``, Procrastinate's default connector
(psycopg 3 with an async pool in the worker; a producer that defers synchronously gets the
``SyncPsycopgConnector`` it summons itself). Schema: ``procrastinate schema --apply``.

Workers: 2 ``procrastinate --app bench.peers.procrastinate_app.app --log-level warning worker``
processes: its documented way to run jobs in parallel ("launch multiple workers, each using
their own process"), with its defaults: concurrency 1 (one job at a time per worker),
LISTEN/NOTIFY on with a 5 s polling fallback, finished jobs kept (``delete_jobs`` never).
The ``--concurrency 16`` variant matches taskmill's ``-c 16``. Procrastinate runs a sync task
(its usual style, used here) in a thread through asgiref's ``sync_to_async``; an async task
runs on the worker's event loop (``CMP_PROCRASTINATE_VARIANT=async`` sends those instead).
Producer: ``python -m bench.peers.procrastinate_app enqueue N | pace RATE SECONDS``; the bulk
enqueue is ``batch_defer`` (one multi-row ``INSERT`` per call), in batches of 1,000.
"""

from __future__ import annotations

import os
from typing import Any

from procrastinate import App, PsycopgConnector

from bench.peers import _common

app = App(connector=PsycopgConnector(conninfo=os.environ.get("CMP_PG_URL", "")))
ASYNC = os.environ.get("CMP_PROCRASTINATE_VARIANT", "sync") == "async"


# Named: run as ``python -m`` this module is ``__main__`` in the producer, and a task's default
# name is its module's.
@app.task(name="drain_probe")
def drain_probe() -> None:
    _common.drain()


@app.task(name="lat_probe")
def lat_probe(sent: float) -> None:
    _common.record_latency(sent)


@app.task(name="adrain_probe")
async def adrain_probe() -> None:
    await _common.adrain()


@app.task(name="alat_probe")
async def alat_probe(sent: float) -> None:
    await _common.arecord_latency(sent)


def enqueue(n: int) -> str:
    task: Any = adrain_probe if ASYNC else drain_probe
    with app.open():
        for start in range(0, n, 1000):
            task.batch_defer(*[{}] * min(1000, n - start))
    return "batch_defer, batches of 1,000"


def paced(rate: float, seconds: float) -> dict[str, Any]:
    task: Any = alat_probe if ASYNC else lat_probe
    with app.open():
        return _common.pace(rate, seconds, lambda sent: task.defer(sent=sent))


if __name__ == "__main__":
    _common.run_cli(enqueue, paced=paced)
