"""``GET /metrics``: the broker's figures in Prometheus's text format, read at scrape time.

Each scrape reads the admin API once (``astats`` and ``aworkers``, within
``SCRAPE_TIMEOUT_S``) and a collector turns what it read into metric families: there are no
gauges kept between scrapes, so every dashboard replica (and every scrape) says what the broker
holds now. Each application made by ``create_app`` has its own ``CollectorRegistry``; nothing
is registered in prometheus-client's global one.

- ``taskmill_jobs{queue,state}``: jobs in each state;
- ``taskmill_queue_oldest_waiting_seconds{queue}``: the age of the oldest due job not started
  (0 when none waits);
- ``taskmill_queue_paused{queue}``: 1 while the queue is paused;
- ``taskmill_workers`` and ``taskmill_workers_lost``: registered workers that heartbeated
  recently, and those that did not;
- ``taskmill_workers_running_jobs`` and ``taskmill_workers_concurrency``: the jobs the alive
  workers run, and how many they may run at once;
- ``taskmill_broker_up``: 1 if the broker answered, 0 if not (the other families are then
  left out, and the response is still a 200 so the scrape itself does not look down);
- ``taskmill_scrape_duration_seconds``: how long reading the broker took.

The route sits behind the application's auth like every other (a read-only user or token is
enough); see ``docs/metrics.md`` for a scrape configuration.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from taskmill.web.context import web_of

if TYPE_CHECKING:
    from taskmill.admin import WorkerStatus
    from taskmill.job import QueueStats

log = logging.getLogger("taskmill.web")

SCRAPE_TIMEOUT_S = 5.0
"""How long a scrape waits for the broker before it reports ``taskmill_broker_up 0``."""


@dataclass(frozen=True)
class Figures:
    """What one scrape read from the broker (``None``: the broker did not answer)."""

    stats: list[QueueStats] | None
    workers: list[WorkerStatus] | None
    seconds: float


_scraped: ContextVar[Figures | None] = ContextVar("taskmill_scraped", default=None)
"""The figures of the scrape being rendered: set by the route, for its own task only."""


class BrokerCollector:
    """Turns the figures of the scrape in progress into metric families (nothing outside a
    scrape)."""

    def collect(self) -> Iterator[Metric]:
        figures = _scraped.get()
        if figures is None:
            return
        up = figures.stats is not None and figures.workers is not None
        yield _gauge("taskmill_broker_up", "1 if the broker answered this scrape.", 1 if up else 0)
        yield _gauge(
            "taskmill_scrape_duration_seconds",
            "How long reading the broker took, in seconds.",
            round(figures.seconds, 6),
        )
        if figures.stats is not None:
            yield from queue_families(figures.stats)
        if figures.workers is not None:
            yield from worker_families(figures.workers)


def _gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, text, value=value)


def queue_families(stats: list[QueueStats]) -> Iterator[Metric]:
    jobs = GaugeMetricFamily(
        "taskmill_jobs", "Jobs stored, by queue and state.", labels=("queue", "state")
    )
    oldest = GaugeMetricFamily(
        "taskmill_queue_oldest_waiting_seconds",
        "Age of the oldest due job not started yet, in seconds (0: none waits).",
        labels=("queue",),
    )
    paused = GaugeMetricFamily(
        "taskmill_queue_paused", "1 while the queue is paused.", labels=("queue",)
    )
    for s in stats:
        for state, count in sorted(s.counts.items()):
            jobs.add_metric([s.queue, state], count)
        oldest.add_metric([s.queue], round(s.oldest_waiting_s or 0.0, 3))
        paused.add_metric([s.queue], 1 if s.paused else 0)
    yield from (jobs, oldest, paused)


def worker_families(workers: list[WorkerStatus]) -> Iterator[Metric]:
    alive = [w for w in workers if not w.lost]
    yield _gauge("taskmill_workers", "Registered workers that heartbeated recently.", len(alive))
    yield _gauge(
        "taskmill_workers_lost",
        "Registered workers whose last heartbeat is too old (lost, or stopped uncleanly).",
        len(workers) - len(alive),
    )
    yield _gauge(
        "taskmill_workers_running_jobs",
        "Jobs the alive workers are running.",
        sum(len(w.running) for w in alive),
    )
    yield _gauge(
        "taskmill_workers_concurrency",
        "Jobs the alive workers may run at once.",
        sum(w.concurrency for w in alive),
    )


async def read_figures(request: Request) -> Figures:
    app = web_of(request).app
    began = time.perf_counter()
    try:
        async with asyncio.timeout(SCRAPE_TIMEOUT_S):
            stats = await app.astats()
            workers = await app.aworkers()
    except Exception as exc:  # the scrape says so (taskmill_broker_up 0); the log says why
        log.warning("metrics: the broker did not answer: %s: %s", type(exc).__name__, exc)
        return Figures(None, None, time.perf_counter() - began)
    return Figures(stats, workers, time.perf_counter() - began)


def registry_of(request: Request) -> CollectorRegistry:
    """This application's registry, made at its first scrape."""
    state = request.app.state
    registry: CollectorRegistry | None = getattr(state, "metrics_registry", None)
    if registry is None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(BrokerCollector())
        state.metrics_registry = registry
    return registry


async def metrics(request: Request) -> Response:
    registry = registry_of(request)
    encoder, content_type = choose_encoder(request.headers.get("accept", ""))
    token = _scraped.set(await read_figures(request))
    try:
        body = encoder(registry)
    finally:
        _scraped.reset(token)
    return Response(body, media_type=content_type, headers={"Cache-Control": "no-store"})


def routes() -> list[BaseRoute]:
    return [Route("/metrics", metrics, methods=["GET"])]


__all__ = ["SCRAPE_TIMEOUT_S", "BrokerCollector", "Figures", "routes"]
