"""The web tests' fixtures: the real ASGI app under uvicorn, on a free loopback port, on each
server broker (SQLite, Redis, PostgreSQL: the servers of ``tests/conftest.py``), and an httpx
client for it.

``serve(app, config)`` starts a server for an ``App`` (``WebConfig`` optional) and returns its
base URL; every server stops at teardown. ``web_url`` is a URL on this test's broker (a file in
the temp dir, a Redis key prefix, a PostgreSQL schema of its own), ``web_app`` the test app of
``webapp.py`` on it, and ``api`` an ``httpx.Client`` for ``web_app`` served without auth.
"""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import psycopg
import pytest
import redis
import uvicorn

from taskmill import App
from taskmill.brokers import postgres as pg
from taskmill.testing import wait_until
from taskmill.web import WebConfig, create_app
from web.webapp import build_app

WEB_BROKERS = ("sqlite", "redis", "postgres")


@dataclass
class Served:
    """A uvicorn server running ``create_app(app, config)`` on a thread of this process."""

    url: str
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        assert not self.thread.is_alive(), "the uvicorn server did not stop within 15 s"


def start_server(app: App, config: WebConfig | None = None) -> Served:
    """Serve ``app`` on a loopback port the OS picked (bound here, so no other process can
    take it between choosing and listening)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv_config = uvicorn.Config(
        create_app(app, config),
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(uv_config)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # reported by the wait below
            errors.append(exc)
        finally:
            sock.close()

    thread = threading.Thread(target=run, name=f"uvicorn-{port}", daemon=True)
    thread.start()

    def started() -> bool:
        assert not errors, f"uvicorn failed to start: {errors[0]!r}"
        assert thread.is_alive() or server.started, "uvicorn exited at start"
        return server.started

    wait_until(started, timeout=15, what="uvicorn to start")
    return Served(f"http://127.0.0.1:{port}", server, thread)


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
