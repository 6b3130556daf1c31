"""A worker's periodic upkeep of the whole store, not of its own jobs.

Every recovery interval (± 20 %, so that workers started together spread out): recover the
expired leases of any worker (``Broker.recover``: a job whose worker died goes back to the
queue, or fails after ``max_lost_leases``), sweep running workflows (``workflows.sweep``
advances those a worker died before advancing), and every ``prune_interval_s`` prune finished
jobs older than ``result_ttl_s``. Every ``HEALTH_CHECK_S`` it also asks the broker what needs
an operator (``Broker.health_warnings``: a PostgreSQL snapshot held open, say) and logs each
warning once while it lasts. Every worker does it; each step is safe to run concurrently.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from taskmill.workflows import sweep

if TYPE_CHECKING:
    from taskmill.brokers.base import Broker
    from taskmill.client import Client
    from taskmill.settings import Settings

log = logging.getLogger("taskmill.worker")

PRUNE_BATCH = 1000
HEALTH_CHECK_S = 10.0
"""How often the maintenance loop asks the broker for its ``health_warnings``."""

EPOCH_CHECK_S = 1.0
"""How often a worker reads the broker's epoch marker (a read of one key)."""

__all__ = ["EPOCH_CHECK_S", "HEALTH_CHECK_S", "BrokerWarnings", "maintain", "prune", "watch_epoch"]


class BrokerWarnings:
    """The broker's warnings when last asked, each logged once: at WARNING when it appears,
    at INFO when it is over."""

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self.current: dict[str, str] = {}

    def note(self, found: dict[str, str]) -> None:
        for key, message in found.items():
            if key not in self.current:
                log.warning("worker %s: broker warning (%s): %s", self.worker_id, key, message)
        for key in self.current.keys() - found.keys():
            log.info("worker %s: broker warning (%s) is over", self.worker_id, key)
        self.current = found


async def maintain(
    broker: Broker, client: Client, settings: Settings, warnings: BrokerWarnings
) -> None:
    """The upkeep loop, until cancelled; a failed round is logged and the next one comes."""
    interval = settings.effective_recover_interval_s
    next_prune = time.monotonic() + random.uniform(0, settings.prune_interval_s)
    next_check = time.monotonic()
    while True:
        await asyncio.sleep(interval * random.uniform(0.8, 1.2))
        try:
            for job_id, state in await broker.recover(settings.max_lost_leases):
                log.warning("job %s: lease expired, recovered to %s", job_id, state.value)
            await sweep(client)
            if time.monotonic() >= next_prune:
                next_prune = time.monotonic() + settings.prune_interval_s
                await prune(broker, settings.result_ttl_s)
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + HEALTH_CHECK_S
                warnings.note(await broker.health_warnings())
        except Exception as exc:
            log.error("worker %s: maintenance failed: %s", warnings.worker_id, exc)


async def prune(broker: Broker, result_ttl_s: float) -> None:
    """Delete the finished jobs older than ``result_ttl_s`` (by the broker's clock), a batch
    at a time."""
    cutoff = await broker.now() - result_ttl_s
    while await broker.prune(cutoff, PRUNE_BATCH) == PRUNE_BATCH:
        await asyncio.sleep(0)


async def watch_epoch(broker: Broker, worker_id: str, came_back_empty: Callable[[], None]) -> None:
    """Tell a broker that came back empty from an empty one: every ``EPOCH_CHECK_S`` read the
    store's epoch marker (``Broker.epoch``); a marker gone (or another one: a worker elsewhere
    found it gone first) means the broker lost what it stored (a Redis restarted without
    persistence, a NATS store wiped). That is logged at CRITICAL, reported
    (``came_back_empty``: the worker counts it, the metric
    ``taskmill_worker_broker_came_back_empty_total``) and the marker written again; the worker
    keeps running, as new work still flows: what was lost is for the operator to judge.
    Brokers that keep no marker end the loop."""
    seen: str | None = None
    while seen is None:
        try:
            seen = await broker.epoch(mark=True)
        except Exception as exc:
            log.error("worker %s: reading the broker's epoch failed: %s", worker_id, exc)
            await asyncio.sleep(EPOCH_CHECK_S)
            continue
        if seen is None:
            return
    while True:
        await asyncio.sleep(EPOCH_CHECK_S)
        try:
            now = await broker.epoch()
            if now == seen:
                continue
            gone = now is None
            if now is None:
                now = await broker.epoch(mark=True)
        except Exception:  # unreachable: the claim and heartbeat loops say so
            continue
        came_back_empty()
        log.critical(
            "worker %s: the broker came back empty (its epoch marker %s %s; marked %s): "
            "every job, result and schedule mark it stored before is lost; running on",
            worker_id,
            seen,
            "is gone" if gone else "was replaced",
            now,
        )
        seen = now
