"""Huey's side of bench.compare_sqlite (run with its virtualenv's python).

The app: ``SqliteHuey`` on the file ``CMP_SQLITE_PATH``, every storage option at Huey's
default (WAL journal, SQLite's default ``synchronous`` (FULL), an 8 MB page cache, results
stored unless a task returns None: these bodies return None).
Workers: ``huey_consumer bench.peers.huey_app.huey -k process -w 2 -q`` (one consumer whose 2
worker processes run the jobs: Huey's way to run N processes; its scheduler and queue polling
at their defaults, 0.1 s growing by 1.15x to 10 s while the queue is empty); the "huey
threads" variant ``-k thread -w 16``, one process with 16 worker threads (taskmill's ``-c``).
Producer: ``python -m bench.peers.huey_app enqueue N | pace RATE SECONDS``; Huey has no bulk
enqueue, so the enqueue is a loop of task calls (one insert and commit each).
"""

from __future__ import annotations

import os

from huey import SqliteHuey

from bench.peers import _common

huey = SqliteHuey(name="cmp", filename=os.environ.get("CMP_SQLITE_PATH", "huey-bench.db"))


@huey.task()
def drain_probe() -> None:
    _common.drain()


@huey.task()
def lat_probe(sent: float) -> None:
    _common.record_latency(sent)


def enqueue(n: int) -> str:
    for _ in range(n):
        drain_probe()
    return "task call loop, no bulk API"


def send_latency(sent: float) -> None:
    lat_probe(sent)


if __name__ == "__main__":
    # Huey names a task after its module, and run as ``python -m`` this one is ``__main__``:
    # send through the module as the consumer imports it.
    from bench.peers import huey_app

    _common.run_cli(huey_app.enqueue, huey_app.send_latency)
