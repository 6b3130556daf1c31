"""The dashboard's ``GET /metrics`` on SQLite, Redis and PostgreSQL: what the broker holds,
read at scrape time, in a text format prometheus-client's own parser reads back; and the
sample Grafana dashboard queries only metrics that exist.

The application runs in-process (httpx's ASGI transport, a loopback client) on each broker's
real server.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from taskmill import App
from taskmill.job import WorkerInfo
from taskmill.web import create_app
from taskmill.worker.metrics import COUNTERS, HISTOGRAMS

ROOT = Path(__file__).resolve().parents[2]


def _sqlite(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/jobs.db"


def _redis(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    server = request.getfixturevalue("redis_server")
    return f"{server.url}?prefix=m{uuid.uuid4().hex[:12]}:"


def _postgres(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    server = request.getfixturevalue("postgres_server")
    return f"{server.url}?schema=m{uuid.uuid4().hex[:12]}"


URLS: dict[str, Callable[[pytest.FixtureRequest, Path], str]] = {
    "sqlite": _sqlite,
    "redis": _redis,
    "postgres": _postgres,
}


@pytest.fixture(params=list(URLS))
async def app(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[App]:
    # a worker silent for 1.5 s is lost (three heartbeats): see register_workers
    a = App(URLS[request.param](request, tmp_path), lease_s=5.0, heartbeat_s=0.5)
    try:
        yield a
    finally:
        await a.aclose()


async def scrape(app: App, accept: str = "") -> httpx.Response:
    transport = httpx.ASGITransport(app=create_app(app))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        return await client.get("/metrics", headers={"accept": accept} if accept else {})


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, by name and sorted labels (parsed by prometheus-client)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def fill(app: App) -> None:
    """Jobs in every state the test checks, a paused queue, an alive and a lost worker."""

    @app.task(name="ok", queue="done")
    def ok() -> None: ...

    @app.task(name="bad", queue="done", retries=0)
    def bad() -> None:
        raise ValueError("no")

    @app.task(name="mail", queue="mail")
    def mail(n: int) -> None: ...

    @app.task(name="report", queue="reports")
    def report() -> None: ...

    for _ in range(2):
        await ok.asend()
    await bad.asend()
    assert await app.arun_until_idle(queues=["done"]) == 3
    for n in range(3):
        await mail.asend(n)
    await mail.options(delay=3600).asend(9)
    await report.asend()
    await report.asend()
    await app.apause("reports")
    await register_workers(app)


async def register_workers(app: App) -> None:
    """Two workers: "alive" heartbeats until "gone", silent since the start, is lost."""
    broker = await app.client.abroker()

    async def beat(worker_id: str, running: list[str]) -> None:
        now = await broker.now()
        info = WorkerInfo(worker_id, "host", 1, ["mail"], 4, now, now, running)
        await broker.heartbeat(info, [], 5.0)

    await beat("gone", [])
    deadline = time.monotonic() + 10
    while True:
        await beat("alive", ["j1", "j2"])
        lost = {w.id: w.lost for w in await app.aworkers()}
        if lost == {"alive": False, "gone": True}:
            return
        assert time.monotonic() < deadline, f"the workers' states: {lost}"
        await asyncio.sleep(0.05)  # a heartbeat interval between polls, not a synchronisation


async def test_metrics_say_what_the_broker_holds(app: App) -> None:
    await fill(app)
    reply = await scrape(app)
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    got = samples(reply.text)

    def jobs(queue: str, state: str) -> float:
        return got[("taskmill_jobs", (("queue", queue), ("state", state)))]

    assert (jobs("done", "succeeded"), jobs("done", "failed"), jobs("done", "queued")) == (2, 1, 0)
    assert (jobs("mail", "queued"), jobs("mail", "scheduled"), jobs("mail", "running")) == (3, 1, 0)
    assert jobs("reports", "queued") == 2
    paused = {q: got[("taskmill_queue_paused", (("queue", q),))] for q in ("done", "reports")}
    assert paused == {"done": 0, "reports": 1}
    oldest = got[("taskmill_queue_oldest_waiting_seconds", (("queue", "mail"),))]
    assert 0 <= oldest < 60
    assert got[("taskmill_queue_oldest_waiting_seconds", (("queue", "done"),))] == 0
    assert got[("taskmill_workers", ())] == 1
    assert got[("taskmill_workers_lost", ())] == 1
    assert got[("taskmill_workers_running_jobs", ())] == 2
    assert got[("taskmill_workers_concurrency", ())] == 4
    assert got[("taskmill_broker_up", ())] == 1


async def test_metrics_are_read_at_each_scrape_with_a_registry_per_application(app: App) -> None:
    @app.task(name="mail", queue="mail")
    def mail() -> None: ...

    asgi = create_app(app)
    transport = httpx.ASGITransport(app=asgi)
    key = ("taskmill_jobs", (("queue", "mail"), ("state", "queued")))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        assert samples((await client.get("/metrics")).text)[key] == 0
        await mail.asend()
        await mail.asend()
        assert samples((await client.get("/metrics")).text)[key] == 2
        # OpenMetrics when asked for it, parsed back the same
        reply = await client.get("/metrics", headers={"accept": "application/openmetrics-text"})
        assert reply.headers["content-type"].startswith("application/openmetrics-text")
        assert reply.text.rstrip().endswith("# EOF")
    other = create_app(app)  # a second application: a registry of its own
    transport = httpx.ASGITransport(app=other)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        assert samples((await client.get("/metrics")).text)[key] == 2
    assert other.state.metrics_registry is not asgi.state.metrics_registry
    # nothing went to prometheus-client's global registry
    assert not [m.name for m in REGISTRY.collect() if m.name.startswith("taskmill")]


async def test_a_broker_that_does_not_answer_is_taskmill_broker_up_0(tmp_path: Path) -> None:
    closed = tmp_path / "no-such-dir" / "jobs.db"  # SQLite cannot create it: every read fails
    app = App(f"sqlite:///{closed}")
    try:
        reply = await scrape(app)
    finally:
        await app.aclose()
    assert reply.status_code == 200
    got = samples(reply.text)
    assert got[("taskmill_broker_up", ())] == 0
    assert not [name for name, _ in got if name.startswith("taskmill_jobs")]


# --- the sample Grafana dashboard ---------------------------------------------------------------


def queried_metrics(dashboard: dict[str, Any]) -> set[str]:
    """Every taskmill metric name in the dashboard's queries (targets' ``expr``)."""
    exprs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                exprs.append(node["expr"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(dashboard)
    assert exprs, "the dashboard has no queries"
    return {name for expr in exprs for name in re.findall(r"\btaskmill_[a-z_]+", expr)}


async def test_the_grafana_dashboard_queries_only_metrics_that_exist(tmp_path: Path) -> None:
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    app = App(f"sqlite:///{tmp_path}/jobs.db", heartbeat_s=0.5)
    try:
        await fill(app)
        dashboard_side = {name for name, _ in samples((await scrape(app)).text)}
    finally:
        await app.aclose()
    worker_side = {f"{name}_total" for name in COUNTERS} | {
        f"{name}_{part}" for name in HISTOGRAMS for part in ("bucket", "sum", "count")
    }
    unknown = queried_metrics(dashboard) - dashboard_side - worker_side
    assert not unknown, f"the dashboard queries metrics that do not exist: {sorted(unknown)}"
    assert {"taskmill_jobs", "taskmill_worker_jobs_finished_total"} <= queried_metrics(dashboard)
