"""The fault proxy (``proxy.py``) against real servers: it forwards faithfully, and each fault
looks to a client as it would on a real network (latency within bounds, a reset, a timeout, a
write applied whose reply never came)."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from servers import PostgresServer, RedisServer
from taskmill import App
from taskmill.testing import running_worker, wait_until

from .proxy import FaultProxy

pytestmark = pytest.mark.timeout(60)

SLACK_S = 0.5
"""How much later than the injected latency a round trip may come on a loaded 2-core machine."""


@pytest.fixture
def redis_proxy(redis_server: RedisServer) -> Iterator[FaultProxy]:
    with FaultProxy(redis_server.host, redis_server.port) as proxy:
        yield proxy


def client(proxy: FaultProxy, *, timeout: float = 5.0) -> redis.Redis:
    """A client that does not retry: each fault shows as the error it causes."""
    return redis.Redis(
        host=proxy.host,
        port=proxy.port,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )


def direct(server: RedisServer) -> redis.Redis:
    return redis.Redis(host=server.host, port=server.port, socket_timeout=5)


PING = b"*1\r\n$4\r\nPING\r\n"


def _double(x: int) -> int:
    return 2 * x


def test_a_taskmill_app_sends_and_runs_jobs_through_the_proxy_on_redis(
    redis_server: RedisServer, redis_proxy: FaultProxy
) -> None:
    prefix = f"proxy{uuid.uuid4().hex[:8]}:"
    app = App(redis_proxy.url(f"{redis_server.url}?prefix={prefix}"))
    task = app.task(name="double")(_double)
    try:
        with running_worker(app):
            handles = [task.send(i) for i in range(20)]
            assert [h.result(timeout=20) for h in handles] == [2 * i for i in range(20)]
    finally:
        app.close()
    stats = redis_proxy.stats()
    assert stats.accepted >= 1 and stats.bytes_up > 0 and stats.bytes_down > 0


def test_a_taskmill_app_sends_and_runs_jobs_through_the_proxy_on_postgres(
    postgres_server: PostgresServer,
) -> None:
    url = postgres_server.create_database(f"proxy_{uuid.uuid4().hex[:8]}")
    with FaultProxy(postgres_server.host, postgres_server.port) as proxy:
        app = App(proxy.url(url))
        task = app.task(name="double")(_double)
        try:
            with running_worker(app):
                handles = [task.send(i) for i in range(20)]
                assert [h.result(timeout=20) for h in handles] == [2 * i for i in range(20)]
        finally:
            app.close()
        assert proxy.stats().accepted >= 1


def test_latency_is_added_per_direction(redis_proxy: FaultProxy) -> None:
    conn = client(redis_proxy)
    conn.ping()  # connected before measuring

    def round_trip() -> float:
        started = time.monotonic()
        conn.ping()
        return time.monotonic() - started

    baseline = min(round_trip() for _ in range(5))
    redis_proxy.set_latency(up_s=0.2)
    up = min(round_trip() for _ in range(3))
    redis_proxy.set_latency(down_s=0.3)
    down = min(round_trip() for _ in range(3))
    redis_proxy.set_latency(up_s=0.2, down_s=0.3)
    both = min(round_trip() for _ in range(3))
    redis_proxy.set_latency()
    after = min(round_trip() for _ in range(5))
    conn.close()
    assert 0.2 <= up < 0.2 + SLACK_S, up
    assert 0.3 <= down < 0.3 + SLACK_S, down
    assert 0.5 <= both < 0.5 + SLACK_S, both
    assert after < baseline + SLACK_S, (baseline, after)


def test_drop_connections_resets_open_connections_and_accepts_new_ones(
    redis_proxy: FaultProxy,
) -> None:
    conn = socket.create_connection((redis_proxy.host, redis_proxy.port), timeout=5)
    conn.sendall(PING)
    assert conn.recv(100) == b"+PONG\r\n"
    assert redis_proxy.drop_connections() == 1
    with pytest.raises(ConnectionResetError):  # a reset, not a timeout nor a clean close
        conn.recv(100)
    conn.close()
    fresh = client(redis_proxy)
    assert fresh.ping()
    assert redis_proxy.stats().reset == 1
    fresh.close()


def test_blackhole_holds_connections_silent_and_heal_delivers_what_was_held(
    redis_server: RedisServer, redis_proxy: FaultProxy
) -> None:
    key = f"proxy:{uuid.uuid4().hex}"
    conn = client(redis_proxy, timeout=0.5)
    assert conn.ping()
    held = socket.create_connection((redis_proxy.host, redis_proxy.port), timeout=5)
    redis_proxy.blackhole()
    # an open connection: the command goes nowhere, the client times out (no reset)
    started = time.monotonic()
    with pytest.raises(redis.TimeoutError):
        conn.set(key, "1")
    assert 0.5 <= time.monotonic() - started < 0.5 + SLACK_S
    # a new connection is accepted, then nothing: again a timeout, not a refusal
    with pytest.raises(redis.TimeoutError):
        client(redis_proxy, timeout=0.5).ping()
    held.sendall(PING)
    held.settimeout(0.3)
    with pytest.raises(TimeoutError):
        held.recv(100)
    assert direct(redis_server).get(key) is None  # the held SET did not reach Redis
    redis_proxy.heal()
    held.settimeout(5)
    assert held.recv(100) == b"+PONG\r\n"  # what was held is delivered after the heal
    held.close()
    assert client(redis_proxy).ping()
    conn.close()


def test_drop_responses_applies_the_write_but_the_client_never_hears(
    redis_server: RedisServer, redis_proxy: FaultProxy
) -> None:
    key = f"proxy:{uuid.uuid4().hex}"
    conn = client(redis_proxy, timeout=0.5)
    assert conn.ping()
    redis_proxy.drop_responses()
    with pytest.raises(redis.TimeoutError):
        conn.set(key, "committed")
    assert direct(redis_server).get(key) == b"committed"  # an ambiguous commit
    assert redis_proxy.stats().dropped_down > 0
    redis_proxy.heal()  # the connection that lost a reply is reset: its stream is corrupt
    wait_until(lambda: redis_proxy.stats().open == 0, what="the corrupt connection to go")
    conn.close()
    assert client(redis_proxy).get(key) == b"committed"


def test_postgres_faults_as_psycopg_sees_them(postgres_server: PostgresServer) -> None:
    with FaultProxy(postgres_server.host, postgres_server.port) as proxy:
        url = proxy.url(postgres_server.url)
        conn = psycopg.connect(url, autocommit=True, connect_timeout=5)
        assert conn.execute("SELECT 1").fetchone() == (1,)
        proxy.set_latency(up_s=0.2, down_s=0.1)
        started = time.monotonic()
        conn.execute("SELECT 1")
        assert 0.3 <= time.monotonic() - started < 0.3 + SLACK_S
        proxy.set_latency()
        proxy.drop_connections()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
        conn.close()
        proxy.blackhole()
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError):  # the startup never answers
            psycopg.connect(url, connect_timeout=2)
        assert time.monotonic() - started < 2 + 2 * SLACK_S + 2  # libpq may retry once
        proxy.heal()
        with psycopg.connect(url, autocommit=True, connect_timeout=5) as again:
            assert again.execute("SELECT 1").fetchone() == (1,)
