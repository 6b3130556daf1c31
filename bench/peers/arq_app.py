"""arq's side of bench.compare_redis (run with the arq virtualenv's python: arq 0.28 needs
redis-py < 6, Celery 5.7's kombu needs >= 6.4, so arq gets a virtualenv of its own).

Workers: 2 ``arq bench.peers.arq_app.WorkerSettings`` processes, arq's defaults (max_jobs 10,
poll_delay 0.5 s: arq polls the queue, it has no blocking wake-up; results kept 1 hour), logging
at WARNING like every other library here.
The task bodies use the worker's own Redis connection (``ctx["redis"]``).
Producer: ``python -m bench.peers.arq_app enqueue N | pace RATE SECONDS``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from arq import create_pool
from arq.connections import RedisSettings

from bench.peers import _common

SETTINGS = RedisSettings.from_dsn(_common.redis_url())


async def drain_probe(ctx: dict[str, Any]) -> None:
    await _common.adrain(ctx["redis"])


async def lat_probe(ctx: dict[str, Any], sent: float) -> None:
    await _common.arecord_latency(sent, ctx["redis"])


# For ``arq --custom-log-dict``: arq's own config at WARNING (its default logs two lines a job).
LOG_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"h": {"level": "WARNING", "class": "logging.StreamHandler"}},
    "loggers": {"arq": {"handlers": ["h"], "level": "WARNING"}},
}


class WorkerSettings:
    functions = [drain_probe, lat_probe]
    redis_settings = SETTINGS


def enqueue(n: int) -> str:
    async def go() -> None:
        pool = await create_pool(SETTINGS)
        for _ in range(n):
            await pool.enqueue_job("drain_probe")
        await pool.aclose()

    asyncio.run(go())
    return "enqueue_job loop, no bulk API"


def paced(rate: float, seconds: float) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        pool = await create_pool(SETTINGS)
        try:
            return await _common.apace(
                rate, seconds, lambda sent: pool.enqueue_job("lat_probe", sent)
            )
        finally:
            await pool.aclose()

    return asyncio.run(go())


if __name__ == "__main__":
    _common.run_cli(enqueue, paced=paced)
