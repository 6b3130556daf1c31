"""PostgreSQL-specific behaviour that the conformance suite cannot show: enqueue inside the
caller's own transaction, connections killed under an idle worker, worker processes contending
for the same jobs, migrations (step by step, concurrent, turned off), and producers whose
server is down. (A server restarted mid-run: ``test_server_restart.py``.)

Servers are real (``tests/servers.py``): the session's cluster with a database per test, or a
test's own cluster (``postgres_server_own``) when the test stops it. Workers are real
``taskmill worker`` processes or ``running_worker`` threads. Waiting is polling until a
deadline; the only sleeps are an outage's length and a producer's pacing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.pq import TransactionStatus

from servers import PostgresServer
from taskmill import (
    App,
    BrokerError,
    BrokerUnavailableError,
    ConfigurationError,
    DuplicateJobError,
    JobNotFoundError,
    JobState,
)
from taskmill.brokers import postgres as pg
from taskmill.brokers.postgres.connection import pipelined_transaction
from taskmill.job import NewJob
from taskmill.testing import running_worker, wait_until

from .postgres_app import EXECUTIONS_URL_ENV, SETTINGS, record, work
from .support import (
    Workers,
    all_jobs,
    run_at_once,
    state_counts,
    wait_registered,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BOUNDED_WAIT_S = 10.0
"""A producer facing an unreachable server must hear so within this long (the default
``unavailable_after_s`` is 5 s)."""
RESUME_S = 5.0
"""A worker whose connections were terminated must run a new job within this long."""
WOKEN_S = 2.0
"""An idle worker polling every 30 s must start a job within this long: it was woken."""


class Database:
    """A database of one test on a server: its plain URL (for psycopg) and taskmill URLs."""

    def __init__(self, server: PostgresServer, name: str) -> None:
        self.server = server
        self.name = name
        self.url = server.url_for(name)

    def taskmill_url(self, **options: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in options.items())
        return f"{self.url}?{query}" if query else self.url

    def connect(self, **options: Any) -> psycopg.Connection[Any]:
        return self.server.connect(self.name, **options)


def _database(server: PostgresServer) -> Database:
    name = f"t_{uuid.uuid4().hex[:12]}"
    server.create_database(name)
    return Database(server, name)


def _drop(db: Database) -> None:
    if db.server.running:
        with db.server.connect() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{db.name}" WITH (FORCE)')


@pytest.fixture
def database(postgres_server: PostgresServer) -> Iterator[Database]:
    """A database of this test's own on the session's server (dropped afterwards)."""
    db = _database(postgres_server)
    yield db
    _drop(db)


@pytest.fixture
def own_database(postgres_server_own: PostgresServer) -> Database:
    """A database on a server of this test's own (to stop or restart)."""
    return _database(postgres_server_own)


def make_app(url: str, **settings: Any) -> App:
    """An app with the tasks of ``postgres_app`` (what the worker processes load)."""
    app = App(url, **{**SETTINGS, **settings})
    app.task(name="work", retries=5, backoff=0.05)(work)
    app.task(name="record", retries=0)(record)
    return app


def create_executions_table(db: Database) -> None:
    with db.connect() as conn:
        conn.execute(
            "CREATE TABLE public.executions (job_id text NOT NULL, attempt int, pid int, "
            "at timestamptz NOT NULL DEFAULT clock_timestamp())"
        )


def executions(db: Database) -> list[tuple[str, int, int]]:
    with db.connect() as conn:
        return conn.execute("SELECT job_id, attempt, pid FROM public.executions").fetchall()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    w = Workers(tmp_path, "postgres_app:app")
    try:
        yield w
    finally:
        w.close()


# --- (a) transactional enqueue -------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_jobs_sent_in_a_transaction_exist_only_once_it_commits(database: Database) -> None:
    """``options(connection=conn).send``, ``send_many(connection=conn)`` and a cursor: nothing
    is visible before the commit, nothing after a rollback, everything after a commit; and the
    commit itself wakes an idle worker (NOTIFY is transactional), which polls only every 30 s."""
    app = make_app(database.taskmill_url())  # never opened: the first send creates the schema
    task = app.tasks["work"]
    conn = database.connect(autocommit=False)
    try:
        conn.execute("CREATE TABLE users (id serial PRIMARY KEY, email text NOT NULL)")
        conn.commit()

        def send_three(tag: int) -> list[str]:
            conn.execute("INSERT INTO users (email) VALUES (%s)", (f"{tag}@example.com",))
            ids = [task.options(connection=conn).send(tag).id]
            ids += [h.id for h in task.send_many([(tag + 1,), (tag + 2,)], connection=conn)]
            with conn.cursor() as cur:
                ids.append(task.options(connection=cur).send(tag + 3).id)
            return ids

        rolled_back = send_three(10)
        for job_id in rolled_back:  # the app's own connections cannot see them yet
            with pytest.raises(JobNotFoundError):
                app.get_job(job_id)
        conn.rollback()
        assert all_jobs(app) == {}
        with database.connect() as other:
            assert other.execute("SELECT count(*) FROM users").fetchone() == (0,)

        with running_worker(app, idle_poll_s=30.0):
            committed = send_three(20)
            assert all_jobs(app) == {}
            conn.commit()
            committed_at = time.time()
            results = [app.job(i).result(timeout=10) for i in committed]
            assert results == [20, 21, 22, 23]
            started = min(app.get_job(i).started_at or 0 for i in committed)
            assert started - committed_at < WOKEN_S, "the commit did not wake the idle worker"
        for job_id in rolled_back:
            with pytest.raises(JobNotFoundError):
                app.get_job(job_id)
        with database.connect() as other:
            assert other.execute("SELECT count(*) FROM users").fetchone() == (1,)
    finally:
        conn.close()
        app.close()


@pytest.mark.timeout(60)
def test_a_duplicate_key_in_a_transaction_leaves_the_callers_transaction_usable(
    database: Database,
) -> None:
    app = make_app(database.taskmill_url())
    task = app.tasks["work"]

    @app.task(name="keyed", key=lambda n: f"order-{n}")
    def keyed(n: int) -> int:
        return n

    try:
        with database.connect(autocommit=False) as conn:  # commits at the end of the block
            conn.execute("CREATE TABLE orders (id int PRIMARY KEY)")
            conn.execute("INSERT INTO orders VALUES (1)")
            first = task.options(connection=conn, key="order-1").send(1)
            again = task.options(connection=conn, key="order-1").send(2)
            assert again.existing and again.id == first.id
            with pytest.raises(DuplicateJobError) as info:
                task.options(connection=conn, key="order-1", on_conflict="raise").send(3)
            assert info.value.existing_id == first.id
            # order-2 is stored first, then order-1 conflicts: the whole batch is undone
            with pytest.raises(DuplicateJobError):
                keyed.options(connection=conn, on_conflict="raise").send_many([(2,), (1,)])
            # the savepoint undid only our statements: the caller's transaction goes on
            conn.execute("INSERT INTO orders VALUES (2)")
        stored = all_jobs(app)
        assert list(stored) == [first.id]
        assert stored[first.id].key == "order-1" and stored[first.id].payload == b"[[1],{}]"
        with database.connect() as other:
            assert other.execute("SELECT count(*) FROM orders").fetchone() == (2,)
    finally:
        app.close()


async def _async_connection(url: str) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(url)


@pytest.mark.timeout(60)
def test_connections_that_cannot_carry_a_job_are_refused(database: Database) -> None:
    import sqlite3

    app = make_app(database.taskmill_url())
    task = app.tasks["work"]
    try:
        with database.connect(autocommit=True) as conn:
            with pytest.raises(ConfigurationError, match="autocommit"):
                task.options(connection=conn).send(1)
            with conn.transaction():  # with an explicit transaction it is fine
                task.options(connection=conn).send(2)
        with database.connect(autocommit=False) as conn:
            with pytest.raises(psycopg.errors.DivisionByZero):
                conn.execute("SELECT 1 / 0")
            with pytest.raises(BrokerError, match="failed transaction"):
                task.options(connection=conn).send(3)
            conn.rollback()
        aconn = asyncio.run(_async_connection(database.url))
        try:
            with pytest.raises(TypeError, match="synchronous psycopg"):
                task.options(connection=aconn).send(4)
        finally:
            asyncio.run(aconn.close())
        lite = sqlite3.connect(":memory:")
        try:
            with pytest.raises(TypeError, match="psycopg"):
                task.options(connection=lite).send(5)
        finally:
            lite.close()
        with pytest.raises(ConfigurationError, match="asend"):
            app.run_sync(task.options(connection=object()).asend(6))
        assert [j.payload for j in all_jobs(app).values()] == [b"[[2],{}]"]
    finally:
        app.close()


@pytest.mark.timeout(60)
def test_the_documented_transactional_example_runs(database: Database) -> None:
    """The transactional-enqueue example of docs/brokers.md, pointed at this test's database."""
    text = (ROOT / "docs" / "brokers.md").read_text("utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    (example,) = [b for b in blocks if "options(connection=conn)" in b]
    dsns = set(re.findall(r'"(postgresql://[^"]*)"', example))
    assert len(dsns) == 1, f"the example should name one URL: {dsns}"
    code = example.replace(dsns.pop(), database.url)
    with database.connect() as conn:
        conn.execute("CREATE TABLE users (id serial PRIMARY KEY, email text NOT NULL)")
    namespace: dict[str, Any] = {"__name__": "docs_brokers_example"}
    try:
        exec(compile(code, "docs/brokers.md", "exec"), namespace)
    finally:
        app = namespace.get("app")
        if isinstance(app, App):
            app.close()
    check = App(database.url)
    try:
        jobs = all_jobs(check)
        assert len(jobs) == 3 and all(j.task.endswith("send_welcome") for j in jobs.values())
    finally:
        check.close()


# --- (b) connections terminated under an idle worker ----------------------------------------------


def listening_backend(admin: psycopg.Connection[Any], database: str) -> int | None:
    """The pid of a backend sitting in LISTEN (an idle worker waiting for wake-ups)."""
    row = admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = %s AND state = 'idle' "
        "AND query LIKE 'LISTEN %%' AND application_name = 'taskmill'",
        (database,),
    ).fetchone()
    return None if row is None else int(row[0])


def terminate_taskmill_backends(admin: psycopg.Connection[Any], database: str) -> int:
    rows = admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = %s AND application_name = 'taskmill' AND pid <> pg_backend_pid()",
        (database,),
    ).fetchall()
    return sum(1 for (ok,) in rows if ok)


@pytest.mark.timeout(90)
def test_worker_resumes_within_5s_after_pg_terminate_backend(
    database: Database, workers: Workers
) -> None:
    """Three times: wait until the idle worker listens for wake-ups, terminate every taskmill
    backend of the database (the worker's pools and listener, and the producer's), send a
    job: its result arrives within 5 s, from the same worker process."""
    url = database.taskmill_url()
    app = make_app(url)
    task = app.tasks["work"]
    admin = database.connect()
    try:
        proc = workers.start(url, "--concurrency", "4")
        wait_registered(app, proc, workers)
        assert task.send(0).result(timeout=10) == 0
        for round_ in range(1, 4):
            wait_until(
                lambda: listening_backend(admin, database.name),
                what="the idle worker to LISTEN for wake-ups",
                timeout=15,
            )
            assert terminate_taskmill_backends(admin, database.name) >= 2
            started = time.monotonic()
            handle = task.send(round_)
            try:
                assert handle.result(timeout=RESUME_S) == round_
            except TimeoutError:
                raise AssertionError(
                    f"round {round_}: no result {RESUME_S} s after pg_terminate_backend; "
                    f"job: {app.get_job(handle.id)}\nworker output:\n{workers.output()[-5000:]}"
                ) from None
            elapsed = time.monotonic() - started
            assert elapsed < RESUME_S, f"round {round_}: {elapsed:.2f} s"
            assert proc.poll() is None, f"the worker exited:\n{workers.output()}"
    finally:
        admin.close()
        app.close()


# --- (c) worker processes contending for the same jobs --------------------------------------------


@pytest.mark.timeout(120)
def test_contending_worker_processes_run_each_job_once(
    database: Database, workers: Workers
) -> None:
    """Three worker processes and an in-process worker claim from one queue at once (SKIP
    LOCKED); every job records its execution in a table of the same database. No lease
    expires (3 s leases, 0.3 s heartbeats, short jobs), so each job runs exactly once."""
    create_executions_table(database)
    url = database.taskmill_url()
    app = make_app(url)
    try:
        procs = [
            workers.start(url, "--concurrency", "4", **{EXECUTIONS_URL_ENV: database.url})
            for _ in range(3)
        ]
        for proc in procs:
            wait_registered(app, proc, workers)
        total = 300
        handles = app.tasks["record"].send_many([(n, 0.005) for n in range(total)])
        os.environ[EXECUTIONS_URL_ENV] = database.url  # for the in-process worker's runs
        try:
            with running_worker(app, concurrency=2):
                wait_until(
                    lambda: state_counts(app).get("succeeded") == total,
                    what=lambda: f"{total} jobs to succeed: {state_counts(app)}",
                    timeout=60,
                )
        finally:
            del os.environ[EXECUTIONS_URL_ENV]
        runs = executions(database)
        per_job = Counter(job_id for job_id, _, _ in runs)
        assert set(per_job) == {h.id for h in handles}
        twice = [job_id for job_id, n in per_job.items() if n > 1]
        assert not twice, f"run more than once: {twice}"
        assert {attempt for _, attempt, _ in runs} == {1}
        ran_in = Counter(pid for _, _, pid in runs)
        assert sum(1 for p in procs if ran_in[p.pid]) >= 2, f"work was not shared: {ran_in}"
        counts = state_counts(app)
        assert counts["failed"] == 0 and counts["queued"] == 0
    finally:
        app.close()


# --- (d) migrations -------------------------------------------------------------------------------


def catalog(conn: psycopg.Connection[Any], schema: str) -> dict[str, list[tuple[Any, ...]]]:
    """What a schema is made of (tables, columns, indexes, constraints, storage options), with
    its own name taken out so two schemas compare."""

    def rows(query: str) -> list[tuple[Any, ...]]:
        found = conn.execute(query, {"schema": schema}).fetchall()
        return sorted(tuple(str(v).replace(schema + ".", "S.") for v in r) for r in found)

    return {
        "columns": rows(
            "SELECT table_name, column_name, ordinal_position, data_type, is_nullable, "
            "column_default, is_identity, identity_generation FROM information_schema.columns "
            "WHERE table_schema = %(schema)s"
        ),
        "indexes": rows("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = %(schema)s"),
        "constraints": rows(
            "SELECT c.conrelid::regclass::text, c.conname, c.contype, pg_get_constraintdef(c.oid) "
            "FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace "
            "WHERE n.nspname = %(schema)s"
        ),
        "tables": rows(
            "SELECT c.relname, c.relkind, c.reloptions FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %(schema)s "
            "AND c.relkind IN ('r', 'p', 'S')"
        ),
        "statistics": rows(
            "SELECT s.stxname, pg_get_statisticsobjdef(s.oid) FROM pg_statistic_ext s "
            "JOIN pg_namespace n ON n.oid = s.stxnamespace WHERE n.nspname = %(schema)s"
        ),
        "versions": sorted(
            conn.execute(f"SELECT version, name FROM {schema}.schema_version").fetchall()
        ),
    }


@pytest.mark.timeout(60)
def test_migrating_step_by_step_equals_a_fresh_install(database: Database) -> None:
    latest = pg.migrations()[-1].version
    with database.connect() as conn:
        stepwise = []
        for version in range(1, latest + 1):
            applied = pg.apply_migrations(conn, "stepwise", target=version)
            assert [m.version for m in applied] == [version]
            assert pg.schema_version(conn, "stepwise") == version
            stepwise += applied
        assert pg.apply_migrations(conn, "stepwise") == []  # nothing left
        fresh = pg.apply_migrations(conn, "fresh")
        assert [m.version for m in fresh] == [m.version for m in stepwise]
        assert pg.schema_version(conn, "nothing_here") is None
        a, b = catalog(conn, "stepwise"), catalog(conn, "fresh")
    assert a["columns"] and a["indexes"] and a["tables"]
    for part in a:
        assert a[part] == b[part], f"{part} differ:\n{a[part]}\n{b[part]}"


def run_cli(*args: str, timeout: float = 60) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKMILL_")}
    return subprocess.Popen(
        [sys.executable, "-m", "taskmill", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


@pytest.mark.timeout(90)
def test_concurrent_migrations_all_succeed_and_apply_once(database: Database) -> None:
    """Four ``taskmill migrate`` processes at once, then four apps' first sends at once on
    another fresh schema: the advisory lock serializes them, every one succeeds, and each
    migration is applied once."""
    url = database.taskmill_url(schema="migrated")
    procs = [run_cli("migrate", "--url", url) for _ in range(4)]
    outputs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        outputs.append(out)
    applied = [line for out in outputs for line in out.splitlines() if line.startswith("applied")]
    assert applied == [f"applied {m.name}" for m in pg.migrations()], outputs
    assert sum("up to date" in out for out in outputs) == 3, outputs

    apps = [make_app(database.taskmill_url(schema="first_use")) for _ in range(4)]
    barrier = threading.Barrier(len(apps))
    sent: list[str] = []
    failures: list[BaseException] = []

    def first_send(app: App) -> None:
        try:
            barrier.wait(10)
            sent.append(app.tasks["work"].send(1).id)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=first_send, args=(a,)) for a in apps]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not failures, failures
        assert set(all_jobs(apps[0])) == set(sent) and len(sent) == 4
        with database.connect() as conn:
            assert pg.schema_version(conn, "first_use") == pg.migrations()[-1].version
            (n,) = conn.execute("SELECT count(*) FROM first_use.schema_version").fetchone()
            assert n == len(pg.migrations())
    finally:
        for app in apps:
            app.close()


@pytest.mark.timeout(60)
def test_migrate_false_without_a_schema_says_what_to_do(database: Database) -> None:
    url = database.taskmill_url(schema="not_yet", migrate="false")
    app = make_app(url)
    try:
        with pytest.raises(BrokerError, match="taskmill migrate") as info:
            app.tasks["work"].send(1)
        assert "not_yet" in str(info.value) and "migrate=false" in str(info.value)
        with pytest.raises(BrokerError, match="taskmill migrate"):
            app.open()
        with database.connect() as conn:  # and nothing was created
            assert pg.schema_version(conn, "not_yet") is None
            assert conn.execute("SELECT to_regnamespace('not_yet')").fetchone() == (None,)
    finally:
        app.close()
    out, _ = run_cli("migrate", "--url", url).communicate(timeout=60)
    assert "applied 0001_initial" in out and "applied 0002_schedules" in out, out
    assert "not_yet" in out, out
    app = make_app(url)
    try:
        assert app.tasks["work"].send(2).status() is JobState.QUEUED
    finally:
        app.close()
    out, _ = run_cli("migrate", "--url", url).communicate(timeout=60)
    assert f"is up to date (version {len(pg.migrations())})" in out, out
    out, _ = run_cli("migrate", "--url", "memory://").communicate(timeout=60)
    assert "nothing to migrate" in out, out


# --- (e) producers whose server is unreachable ----------------------------------------------------


@pytest.mark.timeout(120)
def test_producer_gets_broker_unavailable_after_a_bounded_wait(own_database: Database) -> None:
    """The server is stopped: ``send``, ``send_many``, ``asend``, a read and a new app's first
    ``send`` each raise ``BrokerUnavailableError`` within 10 s (``unavailable_after_s`` is 5).
    Every job acknowledged before is still there once the server is back, the same producer
    sends again, and a worker runs them all."""
    server = own_database.server
    url = own_database.taskmill_url()
    app = make_app(url)
    fresh = make_app(url)  # never connected before the outage
    task = app.tasks["work"]
    acked = [task.send(i).id for i in range(5)]
    acked += [h.id for h in task.send_many([(i,) for i in range(5, 10)])]
    attempts: dict[str, Callable[[], object]] = {
        "send": lambda: task.send(100),
        "send_many": lambda: task.send_many([(101,), (102,)]),
        "asend": lambda: app.run_sync(task.asend(103)),
        "get_job": lambda: app.get_job(acked[0]),
        "new app's send": lambda: fresh.tasks["work"].send(104),
    }
    try:
        server.stop()
        try:
            outcomes = run_at_once(attempts, limit=BOUNDED_WAIT_S + 10)
            report = {name: f"{exc!r} after {s:.2f} s" for name, (exc, s) in outcomes.items()}
            for name, (exc, elapsed) in outcomes.items():
                assert isinstance(exc, BrokerUnavailableError), f"{name}: {report}"
                assert elapsed < BOUNDED_WAIT_S, f"{name} took too long: {report}"
                assert "did not answer within 5 s" in str(exc), report
                # a write may have reached the server before it stopped; a read changes nothing
                said = "A write that was under way may still have been applied" in str(exc)
                assert said == (name in ("send", "send_many", "asend")), report
        finally:
            server.start()
        assert set(all_jobs(app)) == set(acked), "acknowledged jobs lost, or refused ones stored"
        again = task.send(200)
        with running_worker(app):
            assert again.result(timeout=10) == 200
            for job_id in acked:
                app.job(job_id).result(timeout=10)
    finally:
        fresh.close()
        app.close()


@pytest.mark.timeout(30)
def test_nothing_listening_fails_within_unavailable_after_s() -> None:
    from servers import free_port

    app = make_app(f"postgresql://postgres@127.0.0.1:{free_port()}/x?unavailable_after_s=1")
    try:
        started = time.monotonic()
        with pytest.raises(BrokerUnavailableError, match="did not answer within 1 s"):
            app.tasks["work"].send(1)
        assert time.monotonic() - started < 3.0
    finally:
        app.close()


@pytest.mark.timeout(30)
def test_a_server_that_refuses_the_connection_is_a_broker_error_at_once(
    database: Database,
) -> None:
    """No such role: a setting to fix, not an outage. No retrying for unavailable_after_s."""
    server = database.server
    url = f"postgresql://nobody@{server.host}:{server.port}/{database.name}"
    app = make_app(url)
    try:
        started = time.monotonic()
        with pytest.raises(BrokerError, match='role "nobody" does not exist') as info:
            app.tasks["work"].send(1)
        assert not isinstance(info.value, BrokerUnavailableError)
        assert time.monotonic() - started < 2.0
    finally:
        app.close()


# --- (f) wake-ups and retried sends ---------------------------------------------------------------


@pytest.mark.timeout(60)
def test_idle_workers_are_woken_not_polling(database: Database) -> None:
    """With a 30 s idle poll, a job sent to an idle worker starts within 2 s (NOTIFY), and a
    job scheduled 1 s ahead while the worker waits starts about 1 s later, not 30 s."""
    app = make_app(database.taskmill_url())
    task = app.tasks["work"]
    try:
        with running_worker(app, idle_poll_s=30.0) as worker:
            assert task.send(0).result(timeout=10) == 0
            wait_until(lambda: worker.waiting_for_work, what="the worker to go idle", timeout=20)
            sent = time.time()
            handle = task.send(1)
            assert handle.result(timeout=10) == 1
            started = app.get_job(handle.id).started_at
            assert started is not None and started - sent < WOKEN_S
            wait_until(lambda: worker.waiting_for_work, what="the worker to go idle", timeout=20)
            later = task.options(delay=1.0).send(2)
            assert later.result(timeout=10) == 2
            job = app.get_job(later.id)
            assert job.started_at is not None
            assert 0 <= job.started_at - job.run_at < WOKEN_S
    finally:
        app.close()


@pytest.mark.timeout(30)
def test_a_send_retried_after_a_lost_reply_is_not_stored_twice(database: Database) -> None:
    """A send whose insert committed but whose reply was lost is retried with the same ids:
    the retry finds them stored and stores nothing again (keys are resolved as before)."""
    broker = pg.PostgresBroker(database.taskmill_url())
    try:
        jobs = [
            NewJob(id=str(uuid.uuid4()), task="t", queue="default", payload=b"[[],{}]", key=key)
            for key in (None, "k", "k", None)
        ]
        first = broker.enqueue_blocking(jobs)
        assert first.existing == {2}

        def retry(conn: psycopg.Connection[Any], retried: bool) -> Any:
            return broker._store(conn, jobs, "return", check_stored=True)

        second = broker._db.run_blocking(retry)
        assert second.ids == first.ids and second.existing == first.existing
        with database.connect() as conn:
            assert conn.execute("SELECT count(*) FROM taskmill.jobs").fetchone() == (3,)
    finally:
        asyncio.run(broker.close())


@pytest.mark.timeout(60)
def test_a_failed_statement_rolls_back_the_whole_pipelined_transaction(database: Database) -> None:
    """The broker's one-round-trip transactions (claims, heartbeats): a statement that fails
    mid-way raises, undoes the statements before it, and leaves the connection idle for the
    pool's next user."""
    with database.connect(autocommit=True) as setup:
        setup.execute("CREATE TABLE public.marks (n int)")

    async def scenario() -> tuple[list[int], TransactionStatus]:
        conn = await psycopg.AsyncConnection.connect(database.url, autocommit=True)
        async with conn:

            async def insert_then_fail() -> None:
                async with pipelined_transaction(conn):
                    await conn.execute("INSERT INTO public.marks VALUES (1)")
                    await conn.execute("SELECT 1 / 0")

            with pytest.raises(psycopg.errors.DivisionByZero):
                await insert_then_fail()
            status = conn.info.transaction_status
            async with pipelined_transaction(conn, durable=False):
                await conn.execute("INSERT INTO public.marks VALUES (2)")
            rows = await (await conn.execute("SELECT n FROM public.marks")).fetchall()
        return [r[0] for r in rows], status

    rows, status = asyncio.run(scenario())
    assert status == TransactionStatus.IDLE
    assert rows == [2]


# --- (g) dead entries in the claims' index ------------------------------------------------------

# Enough jobs leaving the queue at once that a claim walks past the pacer's threshold
# (brokers/postgres/vacuum.py, VacuumPacer.walk_pages: 1,000 pages of the ready index, about
# 160 entries a page).
LEFT_THE_QUEUE = 250_000


def queue_then_finish_in_bulk(db: Database, n: int) -> None:
    """``n`` queued jobs, vacuumed, then all marked succeeded in one statement: dead entries at
    the head of the ready index. Autovacuum is off on the table, so none but ours runs."""
    with db.connect() as conn:
        conn.execute("ALTER TABLE taskmill.jobs SET (autovacuum_enabled = false)")
        conn.execute(
            "INSERT INTO taskmill.jobs (id, task, queue, state, payload, run_at, enqueued_at) "
            "SELECT 'bulk-' || lpad(g::text, 7, '0'), 'work', 'default', 'queued', "
            "'[[0],{}]', clock_timestamp() - interval '1 hour', clock_timestamp() "
            "FROM generate_series(1, %s) AS g",
            (n,),
        )
        conn.execute("VACUUM taskmill.jobs")
        conn.execute(
            "UPDATE taskmill.jobs SET state = 'succeeded', finished_at = now() "
            "WHERE state = 'queued'"
        )


def claim_walk(db: Database) -> int:
    """Pages of the ready index that a claim's ordered walk reads now (the claim's SELECT,
    without its locks)."""
    with db.connect(autocommit=False) as conn:
        conn.execute(
            "SELECT seq FROM taskmill.jobs WHERE state = 'queued' AND queue = 'default' "
            "ORDER BY priority DESC, run_at, seq LIMIT 16"
        ).fetchall()
        row = conn.execute(
            "SELECT pg_stat_get_xact_blocks_fetched('taskmill.jobs_ready'::regclass)"
        ).fetchone()
        conn.rollback()
    assert row is not None
    return int(row[0])


def vacuums(db: Database) -> tuple[int, int]:
    """(manual vacuums, autovacuums) of the jobs table so far."""
    with db.connect() as conn:
        row = conn.execute(
            "SELECT vacuum_count, autovacuum_count FROM pg_stat_user_tables "
            "WHERE relid = 'taskmill.jobs'::regclass"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


@pytest.mark.timeout(120)
def test_a_worker_vacuums_when_its_claims_walk_dead_index_entries(database: Database) -> None:
    """A quarter of a million jobs leave the queue in one statement: every claim walks their
    dead entries in the ready index until a vacuum. The worker sees it from its claims' own
    statistics and vacuums the table at once (autovacuum is off here; on a server it comes a
    minute later at worst), and a claim reads a few pages again."""
    app = make_app(database.taskmill_url())
    task = app.tasks["work"]
    try:
        app.open()
        queue_then_finish_in_bulk(database, LEFT_THE_QUEUE)
        before = vacuums(database)
        walk = claim_walk(database)
        assert walk > 1000, f"the bulk change left only {walk} pages to walk"
        with running_worker(app):
            handles = task.send_many([(i,) for i in range(50)])
            assert [h.result(timeout=30) for h in handles] == [*range(50)]
            wait_until(
                lambda: vacuums(database)[0] > before[0],
                what="the worker to vacuum taskmill.jobs",
                timeout=60,
            )
        assert claim_walk(database) < 20
        assert vacuums(database)[1] == before[1]  # no autovacuum did it
    finally:
        app.close()


@pytest.mark.timeout(120)
def test_a_worker_whose_role_does_not_own_the_table_leaves_it_to_autovacuum(
    database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """Only the owner may vacuum a table: a worker of another role says so once, and runs its
    jobs as before."""
    owner = make_app(database.taskmill_url())
    owner.open()  # migrates
    owner.close()
    role = f"tm_runner_{uuid.uuid4().hex[:8]}"
    with database.connect() as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f"GRANT USAGE ON SCHEMA taskmill TO {role}")
        conn.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA taskmill TO {role}")
        conn.execute(f"GRANT ALL ON ALL SEQUENCES IN SCHEMA taskmill TO {role}")
    queue_then_finish_in_bulk(database, LEFT_THE_QUEUE)
    before = vacuums(database)
    url = database.url.replace("postgres@", f"{role}@", 1) + "?migrate=false"
    app = make_app(url)
    task = app.tasks["work"]
    try:
        logger = "taskmill.brokers.postgres"
        with caplog.at_level(logging.WARNING, logger=logger), running_worker(app):
            handles = task.send_many([(i,) for i in range(50)])
            assert [h.result(timeout=30) for h in handles] == [*range(50)]
            wait_until(
                lambda: any("may not vacuum" in r.getMessage() for r in caplog.records),
                what="the worker to say it may not vacuum",
            )
        warnings = [r for r in caplog.records if "may not vacuum" in r.getMessage()]
        assert len(warnings) == 1
        assert vacuums(database)[0] == before[0]
    finally:
        app.close()
        with database.connect() as conn:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


def test_finished_counts_of_a_large_table_are_estimated(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above ``ESTIMATE_ABOVE_ROWS`` the finished jobs are estimated from the statistics of
    migration 6, and said to be; waiting jobs are still counted. Here ANALYZE samples every
    row, so the estimates come out as the counts."""
    app = App(database.taskmill_url())
    try:
        broker = app.open().broker
        jobs = [NewJob(id=f"{q}-{n:03d}", task="t.work", queue=q, payload=b"[[],{}]")
                for q, n_jobs in (("a", 300), ("b", 100)) for n in range(n_jobs)]  # fmt: skip
        app.run_sync(broker.enqueue(jobs))
        with database.connect(autocommit=True) as conn:
            conn.execute(
                "UPDATE taskmill.jobs SET finished_at = now(), state = CASE "
                "WHEN id < 'a-200' OR queue = 'b' THEN 'succeeded' ELSE 'failed' END "
                "WHERE id < 'a-250' OR queue = 'b'"
            )
            conn.execute("ANALYZE taskmill.jobs")
        exact = {s.queue: s for s in app.stats()}
        assert exact["a"].estimated == [] and exact["a"].counts["failed"] == 50
        monkeypatch.setattr("taskmill.brokers.postgres.broker.ESTIMATE_ABOVE_ROWS", 10)
        stats = {s.queue: s for s in app.stats()}
        assert stats["a"].estimated == stats["b"].estimated == ["cancelled", "failed", "succeeded"]
        assert {k: v for k, v in stats["a"].counts.items() if v} == {
            "queued": 50, "succeeded": 200, "failed": 50,
        }  # fmt: skip
        assert {k: v for k, v in stats["b"].counts.items() if v} == {"succeeded": 100}
        page = app.list_jobs(state="failed", queue="a", limit=10)
        assert (page.total, page.total_estimated, len(page.jobs)) == (50, True, 10)
        assert app.list_jobs(order="finished", limit=1).total == 350
        queued = app.list_jobs(state="queued", queue="a", limit=1)
        assert (queued.total, queued.total_estimated) == (50, False)
        by_task = app.list_jobs(state=["queued", "failed"], task="t.", limit=1)
        assert by_task.total_estimated and by_task.total is not None and by_task.total >= 50
    finally:
        app.close()
