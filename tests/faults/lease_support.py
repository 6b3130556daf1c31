"""What T6 and T14 share: a broker of the test's own on each broker kind, the job records of a
run read back, and waiting for a supervisor's worker processes to register."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from faults.harness import Supervisor
from servers import NatsServer, PostgresServer, RedisServer
from taskmill import App
from taskmill.job import Job
from taskmill.testing import wait_until

BROKERS = ["sqlite", "redis", "postgres", "nats"]


def own_broker(
    request: pytest.FixtureRequest, tmp_path: Path, tag: str, ack_wait_s: float
) -> Iterator[str]:
    """The URL of a broker of this test's own (``request.param`` names its kind): an SQLite
    file, a Redis prefix, a PostgreSQL database or a NATS prefix on the session's servers;
    removed afterwards. NATS's ``ack_wait`` is ``ack_wait_s`` (the test's lease): a dispatch
    message a stopped worker pulled comes back after it, not after the 30 s default."""
    name: str = request.param
    unique = f"{tag}{uuid.uuid4().hex[:10]}"
    if name == "sqlite":
        yield f"sqlite:///{tmp_path / 'broker.db'}"
    elif name == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        yield f"{server.url}?prefix={unique}:"
        client = redis.Redis(server.host, server.port)
        keys = list(client.scan_iter(match=f"{unique}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
    elif name == "postgres":
        postgres: PostgresServer = request.getfixturevalue("postgres_server")
        url = postgres.create_database(unique)
        yield url
        with postgres.connect() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{unique}" WITH (FORCE)')
    else:
        nats: NatsServer = request.getfixturevalue("nats_server")
        yield f"{nats.url}?prefix={unique}&ack_wait={ack_wait_s:g}"


def jobs_of(app: App, ids: list[str]) -> dict[str, Job]:
    """The broker's record of each job in ``ids`` (those it has)."""
    got = app.run_sync(app.broker.get_many(ids))
    return {j.id: j for j in got if j is not None}


def wait_workers(app: App, supervisor: Supervisor, processes: int) -> list[int]:
    """Wait until ``processes`` worker processes of ``supervisor`` are registered with the
    broker; their pids."""

    def registered() -> list[int] | None:
        pids = {supervisor.proc.pid, *supervisor.children()}  # -p 1: no supervisor
        live = {w.pid for w in app.run_sync(app.broker.list_workers())} & pids
        return sorted(live) if len(live) >= processes else None

    def what() -> str:
        return f"{processes} worker processes to register:\n{supervisor.output()[-3000:]}"

    return wait_until(registered, what=what, timeout=60)
