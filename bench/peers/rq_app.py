"""RQ's side of bench.compare_redis (run with the peers' virtualenv's python).

Workers: 2 ``rq worker cmp`` processes. RQ's default ``Worker`` forks a work horse per job (so
every job pays a fork); the SimpleWorker variant (``-w rq.worker.SimpleWorker``) runs jobs in
the worker process itself. The task bodies use the job's own connection (in a forked horse a
new client would otherwise connect once per job). RQ's defaults otherwise (results kept 500 s).
Producer: ``python -m bench.peers.rq_app enqueue N | pace RATE SECONDS``.
"""

from __future__ import annotations

from redis import Redis
from rq import Queue, get_current_job

from bench.peers import _common

queue = Queue("cmp", connection=Redis.from_url(_common.redis_url()))
# By dotted name: run as ``python -m`` this module is ``__main__`` in the producer.
DRAIN, LATENCY = "bench.peers.rq_app.drain_probe", "bench.peers.rq_app.lat_probe"


def drain_probe() -> None:
    job = get_current_job()
    _common.drain(job.connection if job else None)


def lat_probe(sent: float) -> None:
    job = get_current_job()
    _common.record_latency(sent, job.connection if job else None)


def enqueue(n: int) -> str:
    for start in range(0, n, 1000):
        queue.enqueue_many([Queue.prepare_data(DRAIN) for _ in range(min(1000, n - start))])
    return "enqueue_many, batches of 1,000, one pipeline each"


def send_latency(sent: float) -> None:
    queue.enqueue(LATENCY, sent)


if __name__ == "__main__":
    _common.run_cli(enqueue, send_latency)
