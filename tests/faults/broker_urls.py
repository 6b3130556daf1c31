"""A broker of a test's own on the session's servers, with what a fault proxy needs to reach
it: an SQLite file, a Redis prefix, a PostgreSQL database or a NATS prefix."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from servers import NatsServer, PostgresServer, RedisServer

SERVER_BROKERS = ["redis", "postgres", "nats"]
ALL_BROKERS = ["sqlite", *SERVER_BROKERS]


@dataclass(frozen=True)
class BrokerUnderTest:
    name: str
    url: str
    host: str | None = None
    """The server's address (None for SQLite: there is no connection to cut)."""
    port: int | None = None


@contextlib.contextmanager
def broker_under_test(
    request: pytest.FixtureRequest, tmp_path: Path, name: str, tag: str
) -> Iterator[BrokerUnderTest]:
    """``name``'s broker for one test, removed afterwards; ``tag`` starts its prefix or
    database name (the test's number, e.g. ``t13``)."""
    suffix = uuid.uuid4().hex[:10]
    if name == "sqlite":
        yield BrokerUnderTest(name, f"sqlite:///{tmp_path / 'broker.db'}")
    elif name == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        prefix = f"{tag}-{suffix}"
        yield BrokerUnderTest(name, f"{server.url}?prefix={prefix}", server.host, server.port)
        client = redis.Redis(server.host, server.port)
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
    elif name == "postgres":
        postgres: PostgresServer = request.getfixturevalue("postgres_server")
        database = f"{tag}_{suffix}"
        url = postgres.create_database(database)
        yield BrokerUnderTest(name, url, postgres.host, postgres.port)
        with postgres.connect() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    else:
        nats: NatsServer = request.getfixturevalue("nats_server")
        yield BrokerUnderTest(name, f"{nats.url}?prefix={tag}{suffix}", nats.host, nats.port)
