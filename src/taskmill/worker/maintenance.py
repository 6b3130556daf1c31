"""A worker's periodic upkeep of the whole store, not of its own jobs.

Every recovery interval (± 20 %, so that workers started together spread out): recover the
expired leases of any worker (``Broker.recover``: a job whose worker died goes back to the
queue, or fails after ``max_lost_leases``), sweep running workflows (``workflows.sweep``
advances those a worker died before advancing), and every ``prune_interval_s`` prune finished
jobs older than ``result_ttl_s``. Every worker does it; each step is safe to run concurrently.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import TYPE_CHECKING

from taskmill.workflows import sweep

if TYPE_CHECKING:
    from taskmill.brokers.base import Broker
    from taskmill.client import Client
    from taskmill.settings import Settings

log = logging.getLogger("taskmill.worker")

PRUNE_BATCH = 1000

__all__ = ["maintain", "prune"]


async def maintain(broker: Broker, client: Client, settings: Settings, worker_id: str) -> None:
    """The upkeep loop, until cancelled; a failed round is logged and the next one comes."""
    interval = settings.effective_recover_interval_s
    next_prune = time.monotonic() + random.uniform(0, settings.prune_interval_s)
    while True:
        await asyncio.sleep(interval * random.uniform(0.8, 1.2))
        try:
            for job_id, state in await broker.recover(settings.max_lost_leases):
                log.warning("job %s: lease expired, recovered to %s", job_id, state.value)
            await sweep(client)
            if time.monotonic() >= next_prune:
                next_prune = time.monotonic() + settings.prune_interval_s
                await prune(broker, settings.result_ttl_s)
        except Exception as exc:
            log.error("worker %s: maintenance failed: %s", worker_id, exc)


async def prune(broker: Broker, result_ttl_s: float) -> None:
    """Delete the finished jobs older than ``result_ttl_s`` (by the broker's clock), a batch
    at a time."""
    cutoff = await broker.now() - result_ttl_s
    while await broker.prune(cutoff, PRUNE_BATCH) == PRUNE_BATCH:
        await asyncio.sleep(0)
