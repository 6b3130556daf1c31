"""The web tests' fixtures: the real ASGI app under uvicorn, on a free loopback port, on each
server broker (SQLite, Redis, PostgreSQL: the servers of ``tests/conftest.py``), and an httpx
client for it.

``serve(app, config)`` starts a server for an ``App`` (``WebConfig`` optional) and returns its
base URL; every server stops at teardown. ``web_url`` is a URL on this test's broker (a file in
the temp dir, a Redis key prefix, a PostgreSQL schema of its own), ``web_app`` the test app of
``webapp.py`` on it, and ``api`` an ``httpx.Client`` for ``web_app`` served without auth.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import psycopg
import pytest
import redis
from examples._support.serving import Served
from examples._support.serving import serve as serve_asgi

from taskmill import App
from taskmill.brokers import postgres as pg
from taskmill.web import WebConfig, create_app
from web.webapp import build_app

WEB_BROKERS = ("sqlite", "redis", "postgres")


def start_server(app: App, config: WebConfig | None = None) -> Served:
    """Serve ``app`` on a loopback port the OS picked (bound first, so no other process can
    take it between choosing and listening): the examples' own serving helper."""
    return serve_asgi(create_app(app, config), lifespan="off", grace_s=2, timeout_s=15)


@pytest.fixture
def serve() -> Iterator[Callable[..., str]]:
    """``serve(app, config=None) -> base URL``; the servers stop at teardown."""
    servers: list[Served] = []

    def make(app: App, config: WebConfig | None = None) -> str:
        served = start_server(app, config)
        servers.append(served)
        return served.url

    yield make
    for served in reversed(servers):
        served.stop()
        assert not served.thread.is_alive(), "the uvicorn server did not stop within 15 s"


# --- brokers -----------------------------------------------------------------------------------


def _sqlite_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return "sqlite:///" + str(tmp_path / "jobs.db")


def _redis_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    server = request.getfixturevalue("redis_server")
    return f"{server.url}?prefix=w{uuid.uuid4().hex[:12]}:"


def _postgres_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    server = request.getfixturevalue("postgres_server")
    return f"{server.url}?schema=w{uuid.uuid4().hex[:12]}"


def _drop_redis_prefix(url: str) -> None:
    parts = urlsplit(url)
    prefix = dict(parse_qsl(parts.query))["prefix"]
    client = redis.Redis.from_url(parts._replace(query="").geturl(), socket_timeout=10)
    with client:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for start in range(0, len(keys), 1000):
            client.unlink(*keys[start : start + 1000])


def _drop_postgres_schema(url: str) -> None:
    config = pg.parse_url(url)
    with psycopg.connect(config.conninfo, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {config.schema} CASCADE")


_URLS: dict[str, Callable[[pytest.FixtureRequest, Path], str]] = {
    "sqlite": _sqlite_url,
    "redis": _redis_url,
    "postgres": _postgres_url,
}
_CLEANUPS: dict[str, Callable[[str], None]] = {
    "redis": _drop_redis_prefix,
    "postgres": _drop_postgres_schema,
}


@pytest.fixture(params=WEB_BROKERS)
def web_broker(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def web_url(web_broker: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A broker URL of this test's own, on each server broker."""
    url = _URLS[web_broker](request, tmp_path)
    yield url
    cleanup = _CLEANUPS.get(web_broker)
    if cleanup is not None:
        cleanup(url)


@pytest.fixture
def make_app(web_url: str) -> Iterator[Callable[..., App]]:
    """``make_app(**settings)``: the test app (``webapp.py``) on this test's broker."""
    apps: list[App] = []

    def make(**settings: Any) -> App:
        app = build_app(web_url, **settings)
        apps.append(app)
        return app

    yield make
    for app in reversed(apps):
        app.close()


@pytest.fixture
def web_app(make_app: Callable[..., App]) -> App:
    return make_app()


@pytest.fixture
def api(web_app: App, serve: Callable[..., str]) -> Iterator[httpx.Client]:
    """A keep-alive client of ``web_app`` served without auth (loopback: an admin)."""
    with httpx.Client(base_url=serve(web_app), timeout=10) as client:
        yield client
