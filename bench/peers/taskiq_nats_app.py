"""TaskIQ's side of bench.compare_nats: the Task Tracker seed's stack (``../shared/seeds/``,
001: TaskIQ with taskiq-nats), run with the TaskIQ virtualenv's python.

As the seed set it up: ``PullBasedJetStreamBroker`` (a durable pull consumer on a JetStream
stream that taskiq-nats creates with the server's defaults), ``NATSObjectStoreResultBackend``
(every result pickled into a NATS Object Store bucket), unlimited reconnects, a 10 s connect
timeout. taskiq-nats' own defaults otherwise: one message per pull request
(``pull_consume_batch=1``), acknowledged once the result is saved (the worker's default
``--ack-type when_saved``). ``CMP_TASKIQ_RESULTS=0`` leaves the result backend out (the
"taskiq no results" row: the broker alone).

Workers: ``taskiq worker bench.peers.taskiq_nats_app:broker --workers 2`` (2 worker processes
under TaskIQ's process manager, up to 100 async tasks each: its defaults), async tasks, which is
TaskIQ's usual style; logging at WARNING.
Producer: ``python -m bench.peers.taskiq_nats_app enqueue N | pace RATE SECONDS``.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from taskiq import AsyncBroker
from taskiq_nats import NATSObjectStoreResultBackend, PullBasedJetStreamBroker

from bench.peers import _common

SERVERS = os.environ.get("CMP_NATS_URL", "nats://127.0.0.1:4222").split(",")
CONNECT = {"max_reconnect_attempts": -1, "connect_timeout": 10, "drain_timeout": 30}

broker: AsyncBroker = PullBasedJetStreamBroker(servers=SERVERS, **CONNECT)
if os.environ.get("CMP_TASKIQ_RESULTS", "1") == "1":
    broker = broker.with_result_backend(NATSObjectStoreResultBackend(servers=SERVERS, **CONNECT))


@broker.task(task_name="drain_probe")
async def drain_probe() -> None:
    await _common.adrain()


@broker.task(task_name="lat_probe")
async def lat_probe(sent: float) -> None:
    await _common.arecord_latency(sent)


def enqueue(n: int) -> str:
    async def go() -> None:
        await broker.startup()
        try:
            for _ in range(n):
                await drain_probe.kiq()
        finally:
            await broker.shutdown()

    asyncio.run(go())
    return "kiq loop, no bulk API"


def paced(rate: float, seconds: float) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        await broker.startup()  # connected before the timed loop, as the seed's API was
        try:
            return await _common.apace(rate, seconds, lambda sent: lat_probe.kiq(sent))
        finally:
            await broker.shutdown()

    return asyncio.run(go())


if __name__ == "__main__":
    _common.run_cli(enqueue, paced=paced)
