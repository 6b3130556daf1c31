"""PostgreSQL's ``health_warnings``: a transaction of the database holding its snapshot longer
than ``snapshot_warn_s`` (vacuum removes nothing newer meanwhile) is warned about, naming the
session; once it ends, the warning is gone. T22 (tests/faults) runs it through a worker."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest

from servers import PostgresServer
from taskmill import App
from taskmill.errors import ConfigurationError
from taskmill.testing import wait_until


@pytest.fixture
def database(postgres_server: PostgresServer) -> Iterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    url = postgres_server.create_database(name)
    yield url
    with postgres_server.connect() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_a_snapshot_held_past_snapshot_warn_s_is_warned_about_until_it_ends(
    database: str,
) -> None:
    app = App(f"{database}?snapshot_warn_s=1")
    app.open()
    holder = psycopg.connect(database, autocommit=True, application_name="report-job")
    idle = psycopg.connect(database, autocommit=True, application_name="idle-session")
    try:
        assert app.run_sync(app.broker.health_warnings()) == {}
        idle.execute("BEGIN")  # a transaction without a snapshot yet pins nothing
        holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        holder.execute("SELECT 1")  # takes the snapshot
        found = wait_until(
            lambda: app.run_sync(app.broker.health_warnings()),
            what="the warning",
            timeout=10,
            interval=0.1,
        )
        message = found["pinned_snapshot"]
        assert "'report-job'" in message and "idle in transaction" in message
        assert "taskmill.jobs" in message and "snapshot_warn_s=1" in message
        holder.execute("COMMIT")
        assert app.run_sync(app.broker.health_warnings()) == {}
    finally:
        holder.close()
        idle.close()
        app.close()


def test_a_held_snapshot_younger_than_snapshot_warn_s_is_not_warned_about(database: str) -> None:
    app = App(database)  # the default: 30 s
    app.open()
    with psycopg.connect(database, autocommit=True) as holder:
        holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        holder.execute("SELECT 1")
        try:
            assert app.run_sync(app.broker.health_warnings()) == {}
        finally:
            holder.execute("ROLLBACK")
            app.close()


@pytest.mark.parametrize("value", ["0", "-1", "soon"])
def test_snapshot_warn_s_must_be_a_positive_number(value: str) -> None:
    with pytest.raises(ConfigurationError, match="snapshot_warn_s"):
        App(f"postgresql://u@localhost/db?snapshot_warn_s={value}").open()
