"""Everything broker-specific in the conformance suite lives here.

A new broker joins the suite by adding a ``BROKERS`` entry (how to make its URL for one test,
from the test's fixture request and temp dir), a ``CORRUPTERS`` entry (how to overwrite a
stored payload behind taskmill's back) and, if it leaves something behind, a ``CLEANUPS``
entry. The tests themselves only see an ``App`` and the broker contract. Server brokers use
the servers of ``tests/conftest.py`` (Redis: one per session, a key prefix per test;
PostgreSQL: one per session, a schema per test).
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlsplit

import psycopg
import pytest
import redis

from taskmill import App
from taskmill.brokers import broker_from_url
from taskmill.brokers import postgres as pg
from taskmill.brokers.memory import MemoryBroker
from taskmill.brokers.sqlite import channel_dir, parse_url

BAD_PAYLOAD = b"\xff{not json"

DEFAULT_SETTINGS: dict[str, Any] = {"lease_s": 5.0, "heartbeat_s": 0.2, "recover_interval_s": 0.2}
"""Fast heartbeats (cancels and lost leases are seen within 0.2 s) with a lease long enough
that a slow machine never loses one by accident."""
LEASE_SETTINGS: dict[str, Any] = {"lease_s": 1.0, "heartbeat_s": 0.2, "recover_interval_s": 0.2}
"""For tests that wait for leases to expire."""


def _memory_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return "memory://"


def _sqlite_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return "sqlite:///" + str(tmp_path / "jobs.db")  # sqlite:////abs/path/jobs.db


def _redis_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    # the session's server (started on first use), under a key prefix no other test shares
    server = request.getfixturevalue("redis_server")
    return f"{server.url}?prefix=t{uuid.uuid4().hex[:12]}:"


def _postgres_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    # the session's server (started on first use), in a schema no other test shares
    server = request.getfixturevalue("postgres_server")
    return f"{server.url}?schema=t{uuid.uuid4().hex[:12]}"


def _nats_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    # the session's server (started on first use), under a prefix no other test shares
    server = request.getfixturevalue("nats_server")
    return f"{server.url}?prefix=t{uuid.uuid4().hex[:12]}"


BROKERS: dict[str, Callable[[pytest.FixtureRequest, Path], str]] = {
    "memory": _memory_url,
    "sqlite": _sqlite_url,
    "redis": _redis_url,
    "postgres": _postgres_url,
    "nats": _nats_url,
}


def _corrupt_memory(app: App, job_id: str) -> None:
    broker = app.broker
    assert isinstance(broker, MemoryBroker)
    with broker._lock:
        broker._jobs[job_id].payload = BAD_PAYLOAD


def _corrupt_sqlite(app: App, job_id: str) -> None:
    path, _ = parse_url(app.url)
    conn = sqlite3.connect(path, timeout=10)
    try:
        with conn:
            cur = conn.execute(
                "UPDATE taskmill_jobs SET payload = ? WHERE id = ?", (BAD_PAYLOAD, job_id)
            )
            assert cur.rowcount == 1
    finally:
        conn.close()


def _redis_client(url: str) -> tuple[redis.Redis, str]:
    """A client of the server a ``redis://…?prefix=…`` URL names, and the URL's key prefix."""
    parts = urlsplit(url)
    prefix = dict(parse_qsl(parts.query)).get("prefix")
    assert prefix, f"a conformance URL always has its own prefix: {url}"
    return redis.Redis.from_url(parts._replace(query="").geturl(), socket_timeout=10), prefix


def _corrupt_redis(app: App, job_id: str) -> None:
    client, prefix = _redis_client(app.url)
    with client:
        key = f"{prefix}job:{job_id}"
        assert client.hexists(key, "payload"), f"{key} has no payload field"
        client.hset(key, "payload", BAD_PAYLOAD)


def _postgres_connection(url: str) -> tuple[psycopg.Connection[Any], str]:
    """An autocommit connection to the database a ``postgresql://…?schema=…`` URL names, and
    the URL's schema."""
    config = pg.parse_url(url)
    return psycopg.connect(config.conninfo, autocommit=True), config.schema


def _corrupt_postgres(app: App, job_id: str) -> None:
    conn, schema = _postgres_connection(app.url)
    with conn:
        cur = conn.execute(
            f"UPDATE {schema}.jobs SET payload = %s WHERE id = %s", (BAD_PAYLOAD, job_id)
        )
        assert cur.rowcount == 1


def _corrupt_nats(app: App, job_id: str) -> None:
    from taskmill.brokers.nats import NatsBroker
    from taskmill.brokers.nats.config import token
    from taskmill.brokers.nats.records import record_decoder, record_encoder

    broker = app.broker
    assert isinstance(broker, NatsBroker)

    async def corrupt() -> None:
        entry = await broker._get("jobs", token(job_id))
        assert entry is not None, f"no record of {job_id}"
        record = record_decoder.decode(entry.value)
        record.payload = BAD_PAYLOAD
        await broker._put("jobs", token(job_id), record_encoder.encode(record), entry.revision)

    # on the broker's own I/O loop, where its connections live
    asyncio.run_coroutine_threadsafe(corrupt(), broker._io_loop()).result(timeout=30)


def _cleanup_nats(url: str) -> None:
    # the session's server outlives the test: drop every stream under the test's prefix
    import nats

    from taskmill.brokers.nats import parse_url

    config = parse_url(url)

    async def drop() -> None:
        nc = await nats.connect(config.servers)
        try:
            js = nc.jetstream()
            for info in await js.streams_info():
                name = info.config.name or ""
                if name.startswith(config.prefix + "_") or name.startswith(f"KV_{config.prefix}_"):
                    await js.delete_stream(name)
        finally:
            await nc.close()

    asyncio.run(drop())


def _cleanup_sqlite(url: str) -> None:
    # the directory of wake-up sockets lives in the temp dir, not beside the database
    shutil.rmtree(channel_dir(parse_url(url)[0]), ignore_errors=True)


def _cleanup_redis(url: str) -> None:
    # the session's server outlives the test: drop every key under the test's prefix
    client, prefix = _redis_client(url)
    with client:
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                client.unlink(*batch)
                batch.clear()
        if batch:
            client.unlink(*batch)


def _cleanup_postgres(url: str) -> None:
    # the session's server outlives the test: drop the test's schema and everything in it
    conn, schema = _postgres_connection(url)
    with conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


CLEANUPS: dict[str, Callable[[str], None]] = {
    "sqlite": _cleanup_sqlite,
    "redis": _cleanup_redis,
    "postgres": _cleanup_postgres,
    "nats": _cleanup_nats,
}

CORRUPTERS: dict[str, Callable[[App, str], None]] = {
    "memory": _corrupt_memory,
    "sqlite": _corrupt_sqlite,
    "redis": _corrupt_redis,
    "postgres": _corrupt_postgres,
    "nats": _corrupt_nats,
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "multiprocess: runs workers or producers in other processes; skipped for brokers that "
        "are not shared across processes",
    )


@pytest.fixture(params=sorted(BROKERS))
def broker_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def broker_url(broker_kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    url = BROKERS[broker_kind](request, tmp_path)
    yield url
    cleanup = CLEANUPS.get(broker_kind)
    if cleanup is not None:
        cleanup(url)


@pytest.fixture(autouse=True)
def _skip_multiprocess(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("multiprocess") is None:
        return
    url = request.getfixturevalue("broker_url")
    if not broker_from_url(url).capabilities.shared_across_processes:
        pytest.skip(f"{url.split(':')[0]} broker is not shared across processes")


class AppFactory(Protocol):
    def __call__(self, *, share: App | None = None, **settings: Any) -> App: ...


@pytest.fixture
def app_factory(broker_url: str) -> Iterator[AppFactory]:
    """``make(**settings)``: an ``App`` on this test's broker (closed at teardown).

    ``share=other`` makes an app that sees ``other``'s jobs: the same URL, or, for a broker
    that lives inside one process, the same broker object.
    """
    apps: list[App] = []

    def make(*, share: App | None = None, **settings: Any) -> App:
        app = App(broker_url, **{**DEFAULT_SETTINGS, **settings})
        if share is not None and not share.broker.capabilities.shared_across_processes:
            app.client.use_broker(share.broker)
        apps.append(app)
        return app

    yield make
    for app in reversed(apps):
        app.close()


@pytest.fixture
def app(app_factory: AppFactory) -> App:
    return app_factory()


@pytest.fixture
def corrupt_payload(broker_kind: str) -> Callable[[App, str], None]:
    """``corrupt_payload(app, job_id)``: overwrite the stored arguments with invalid JSON."""
    return CORRUPTERS[broker_kind]
