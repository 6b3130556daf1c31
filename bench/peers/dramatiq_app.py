"""Dramatiq's side of bench.compare_redis (run with the peers' virtualenv's python).

Worker: ``dramatiq bench.peers.dramatiq_app --processes 2 --threads 8`` (8 is Dramatiq's
default thread count). RedisBroker with Dramatiq's default middleware; no results middleware.
Producer: ``python -m bench.peers.dramatiq_app enqueue N | pace RATE SECONDS``.
"""

from __future__ import annotations

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from bench.peers import _common

broker = RedisBroker(url=_common.redis_url())
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name="cmp", max_retries=0)
def drain_probe() -> None:
    _common.drain()


@dramatiq.actor(queue_name="cmp", max_retries=0)
def lat_probe(sent: float) -> None:
    _common.record_latency(sent)


def enqueue(n: int) -> str:
    # Dramatiq has no bulk enqueue on Redis (a group enqueues one message at a time).
    for _ in range(n):
        drain_probe.send()
    return "send() loop"


def send_latency(sent: float) -> None:
    lat_probe.send(sent)


if __name__ == "__main__":
    _common.run_cli(enqueue, send_latency)
