"""Celery's side of bench.compare_redis (run with the peers' virtualenv's python).

Worker: ``celery -A bench.peers.celery_app worker --pool prefork -c 2`` (one worker node whose
main process consumes from Redis and hands tasks to 2 forked pool processes: Celery's default
pool and its documented way to run N processes). Redis is the broker; no result backend, so
nothing is stored per task (Celery's default). Everything else is Celery's default
(prefetch multiplier 4, acks on receipt).
Producer: ``python -m bench.peers.celery_app enqueue N | pace RATE SECONDS``.
"""

from __future__ import annotations

from celery import Celery

from bench.peers import _common

app = Celery("cmp", broker=_common.redis_url())
app.conf.update(
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="drain_probe")
def drain_probe() -> None:
    _common.drain()


@app.task(name="lat_probe")
def lat_probe(sent: float) -> None:
    _common.record_latency(sent)


def enqueue(n: int) -> str:
    # Celery has no bulk send for independent tasks (a group sends one message per task), so
    # this is apply_async in a loop over one acquired producer (connection), Celery's fast path.
    with app.producer_or_acquire() as producer:
        for _ in range(n):
            drain_probe.apply_async(producer=producer)
    return "apply_async loop, one producer"


def send_latency(sent: float) -> None:
    lat_probe.delay(sent)


if __name__ == "__main__":
    _common.run_cli(enqueue, send_latency)
