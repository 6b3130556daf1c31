"""Fixtures every tier may use: real servers on free loopback ports (see ``servers.py``).

A missing ``redis-server`` fails the tests that need it (it never skips them): CI must run them,
and ``scripts/install-test-deps.sh`` (called by ``make test``) installs it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from servers import RedisServer, ServerMissingError


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
