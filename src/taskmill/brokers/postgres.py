"""The PostgreSQL broker: ``App("postgresql://user:pass@host:5432/db?schema=taskmill")``.

Jobs live in ``{schema}.jobs`` (schema ``taskmill`` by default), created and upgraded by the
versioned migrations in ``sql/postgres_migrations/`` on first use (or by ``taskmill migrate``).
Every query is a named query in ``sql/postgres.sql``; times come from the database's clock.

- A claim is one ``UPDATE … WHERE seq IN (SELECT … FOR UPDATE SKIP LOCKED)`` over a partial
  index of ready jobs. It travels in one transaction and one network round trip (psycopg's
  pipeline mode) with the previous batch's outcomes and the promotion of due scheduled jobs.
- Outcomes are fenced by the lease token inside the ``UPDATE``'s ``WHERE``.
- Idle workers ``LISTEN`` on a connection of their own; enqueues ``pg_notify`` in the same
  statement, so the wake-up is sent when the job is committed (also inside a caller's
  transaction, for transactional enqueue).

psycopg's async connections and pools belong to the event loop that made them, while one broker
serves several loops (the app's portal thread, workers, a user's ``asyncio.run``). As for Redis,
the broker runs its own I/O loop on a thread and calls from loops that are not a worker's
(``attach``) run there. Producers' inserts go through a synchronous pool instead: ``send()``
costs one round trip and no thread hop, and ``asend()`` runs the same code on a thread.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import logging
import math
import os
import re
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, ParamSpec, TypeVar
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import msgspec
import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolClosed

from taskmill.brokers._io import on_io_loop
from taskmill.brokers._rows import (
    RECOVERED_ERROR_TYPE,
    RECOVERED_MESSAGE,
    flatten_outcomes,
    job_from_row,
)
from taskmill.brokers._sql import load_queries
from taskmill.brokers.base import (
    Broker,
    Capabilities,
    EnqueueResult,
    HandOver,
    HeartbeatReply,
    JobPage,
    JobQuery,
    OnConflict,
    Subscription,
    WorkflowRecord,
    decode_cursor,
    encode_cursor,
)
from taskmill.errors import (
    BrokerError,
    BrokerUnavailableError,
    ConfigurationError,
    DuplicateJobError,
)
from taskmill.job import (
    Claim,
    Finish,
    Job,
    JobState,
    NewJob,
    Progress,
    QueueStats,
    WorkerInfo,
)
from taskmill.portal import Portal
from taskmill.urls import redact_url, scrub

log = logging.getLogger("taskmill.brokers.postgres")
T = TypeVar("T")
P = ParamSpec("P")

AsyncConn = psycopg.AsyncConnection[TupleRow]
SyncConn = psycopg.Connection[TupleRow]

DEFAULT_SCHEMA = "taskmill"
_SCHEMA_RE = re.compile(r"[a-z_][a-z0-9_]{0,47}")  # + "_wake" stays within 63 bytes
_OWN_OPTIONS = ("schema", "migrate", "unavailable_after_s", "pool_size")
# A connection lost, refused, or killed (pg_terminate_backend is AdminShutdown, an
# OperationalError), a deadlock, a server starting up or shutting down: worth another try.
_RETRYABLE = (psycopg.OperationalError, psycopg.InterfaceError, OSError, TimeoutError)
_TRANSIENT_FATAL = (
    "starting up",
    "shutting down",
    "recovery mode",
    "not yet accepting",
    "not accepting connections",
    "too many clients",
    "connection slots",
    "terminating connection",
)
# what libpq says when the port answers, but not as PostgreSQL does
_NOT_POSTGRES = (
    "invalid response to SSL negotiation",
    "expected authentication request",
    "received invalid response",
)
_SLOT_LOCK = 0x74736C74  # advisory lock class of concurrency slots ('tslt')
_LOCK_CLASS = 0x746D  # "tm": the first key of the migrations' advisory lock
_KEY_RACE_TRIES = 5
"""How often a send retries a job whose key's holder finished between the insert and the
look-up of the holder (each retry needs that race to happen again)."""

_encoder = msgspec.json.Encoder()
_QUERIES = load_queries("postgres.sql")
_READ_QUERIES = (
    "now", "get", "get_many", "find_jobs_enqueued", "find_jobs_finished", "count_jobs", "stats",
    "workers", "next_due", "schedule_marks",
    "get_workflow", "running_workflows", "queue_depth",
)  # fmt: skip
"""Queries that change nothing: a timeout in one needs no word on writes under way."""


def _retryable(exc: BaseException) -> bool:
    """Worth another try: the server is away, not refusing us. A connection the server
    answered with FATAL (no such role or database, bad password, unknown setting) is a
    setting to fix, unless the FATAL says the server is starting, stopping or full."""
    if isinstance(exc, psycopg.OperationalError) and exc.sqlstate is None:
        text = str(exc)
        if "FATAL:" in text and not any(t in text for t in _TRANSIENT_FATAL):
            return False
        if any(t in text for t in _NOT_POSTGRES):
            return False
    return isinstance(exc, _RETRYABLE)


# --- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PostgresConfig:
    """What a ``postgresql://`` URL says: libpq's connection string and taskmill's options."""

    conninfo: str
    """The URL for libpq, without taskmill's options (libpq's own, e.g. sslmode, stay)."""
    where: str
    """host:port/database, for messages (never the password)."""
    schema: str = DEFAULT_SCHEMA
    migrate: bool = True
    unavailable_after_s: float = 5.0
    pool_size: int = 8


def _bool_option(options: dict[str, str], name: str, default: bool, url: str) -> bool:
    raw = options.pop(name, None)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ConfigurationError(f"{name} in {redact_url(url)!r} must be true or false, not {raw!r}")


def parse_url(url: str) -> PostgresConfig:
    """``postgresql://user:pass@host:port/db?schema=s&migrate=false&unavailable_after_s=5``.

    >>> parse_url("postgres://u@db.internal/app?schema=jobs&sslmode=require").schema
    'jobs'
    """
    shown = redact_url(url)  # for messages: never the password
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigurationError(f"not a PostgreSQL URL: {shown!r}")
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    schema = options.pop("schema", DEFAULT_SCHEMA)
    if not _SCHEMA_RE.fullmatch(schema):
        raise ConfigurationError(
            f"schema in {shown!r} must be a lowercase identifier of at most 48 characters "
            f"(letters, digits, _), not {schema!r}"
        )
    migrate = _bool_option(options, "migrate", True, url)
    try:
        unavailable_after_s = float(options.pop("unavailable_after_s", "5"))
        pool_size = int(options.pop("pool_size", "8"))
    except ValueError:
        raise ConfigurationError(
            f"unavailable_after_s and pool_size in {shown!r} must be numbers"
        ) from None
    if not unavailable_after_s > 0 or pool_size < 2:
        raise ConfigurationError(f"{shown!r}: need unavailable_after_s > 0 and pool_size >= 2")
    # named in pg_stat_activity (and what an operator's pg_terminate_backend filters on)
    options.setdefault("application_name", "taskmill")
    # libpq's connect timeout is whole seconds, at least 2
    options.setdefault("connect_timeout", str(max(2, math.ceil(min(unavailable_after_s, 10)))))
    # libpq decodes %XX but not "+": spaces must be %20 (e.g. options=-c%20statement_timeout=5s)
    query = urlencode(options, quote_via=quote)
    conninfo = urlunsplit(("postgresql", parts.netloc, parts.path, query, ""))
    host = parts.hostname or "localhost"
    where = f"{host}:{parts.port or 5432}{parts.path or '/'}"
    return PostgresConfig(conninfo, where, schema, migrate, unavailable_after_s, pool_size)


def queries(schema: str) -> dict[str, str]:
    """The named queries with ``{schema}`` and ``{columns}`` filled in, and ``enqueue`` in its
    two forms: ``enqueue_many`` (arrays) and ``enqueue_one`` (one row)."""
    texts = dict(_QUERIES)
    enqueue = texts.pop("enqueue")
    texts["enqueue_many"] = enqueue.replace("{rows}", texts.pop("enqueue_rows"))
    texts["enqueue_one"] = enqueue.replace("{rows}", texts.pop("enqueue_row"))
    listing = texts.pop("find_jobs_filter")
    for name in ("find_jobs_enqueued", "find_jobs_finished", "count_jobs"):
        texts[name] = texts[name].replace("{filter}", f"({listing})")
    columns = texts["columns"]
    return {
        name: text.replace("{columns}", columns).replace("{schema}", schema)
        for name, text in texts.items()
    }


# --- migrations ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


@functools.cache
def migrations() -> tuple[Migration, ...]:
    """``sql/postgres_migrations/NNNN_name.sql``, in order (versions 1, 2, … with no gap)."""
    folder = resources.files("taskmill.brokers").joinpath("sql", "postgres_migrations")
    found = []
    for entry in folder.iterdir():
        match = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if match:
            found.append(Migration(int(match[1]), entry.name[:-4], entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise RuntimeError(f"taskmill's PostgreSQL migrations are not numbered 1..n: {found}")
    return tuple(found)


def apply_migrations(conn: SyncConn, schema: str, target: int | None = None) -> list[Migration]:
    """Bring ``schema`` up to ``target`` (default: the latest) in one transaction; the
    migrations that were applied. Concurrent migrators of one schema queue on an advisory
    lock, so the second finds the work done. ``conn`` must be in autocommit mode."""
    q = queries(schema)
    applied: list[Migration] = []
    with conn.transaction():
        conn.execute(q["migration_lock"], {"lock_class": _LOCK_CLASS, "schema": schema})
        conn.execute(q["version_table"])
        done = {row[0] for row in conn.execute(q["applied_versions"])}
        for migration in migrations():
            if target is not None and migration.version > target:
                break
            if migration.version in done:
                continue
            conn.execute(migration.sql.replace("{schema}", schema).encode())
            conn.execute(
                q["record_version"], {"version": migration.version, "name": migration.name}
            )
            applied.append(migration)
        newest = max(done, default=0)
    latest = migrations()[-1].version
    if newest > latest:
        log.warning(
            "PostgreSQL schema %s is at version %d, newer than this taskmill knows (%d): "
            "a newer taskmill migrated it; upgrade this one too",
            schema,
            newest,
            latest,
        )
    return applied


def schema_version(conn: SyncConn, schema: str) -> int | None:
    """The schema's migration version; None if taskmill's tables are not there."""
    q = queries(schema)
    row = conn.execute(q["version_table_exists"], {"table": f"{schema}.schema_version"}).fetchone()
    if row is None or not row[0]:
        return None
    version = conn.execute(q["current_version"]).fetchone()
    return None if version is None or version[0] is None else int(version[0])


# --- rows and parameters ------------------------------------------------------------------------


def _enqueue_params(jobs: Sequence[NewJob], channel: str) -> dict[str, Any]:
    """One job's columns, or a batch as one array per column: the statement text never
    changes with the batch's size, so the server plans it once (psycopg prepares it after a
    few uses)."""
    if len(jobs) == 1:
        j = jobs[0]
        return {
            "id": j.id,
            "task": j.task,
            "queue": j.queue,
            "payload": j.payload,
            "priority": j.priority,
            "run_at": j.run_at,
            "delay": j.delay_s,
            "max_attempts": j.max_attempts,
            "timeout": j.timeout_s,
            "key": j.key,
            "meta": _meta_text(j.meta),
            "channel": channel,
        }
    # arrays go in binary (no text escaping, bytea not hex-encoded), which types each array by
    # its first element: numbers are made uniformly float or int first
    return {
        "ids": [j.id for j in jobs],
        "tasks": [j.task for j in jobs],
        "queues": [j.queue for j in jobs],
        "payloads": [j.payload for j in jobs],
        "priorities": [int(j.priority) for j in jobs],
        "run_ats": [None if j.run_at is None else float(j.run_at) for j in jobs],
        "delays": [float(j.delay_s) for j in jobs],
        "max_attempts": [int(j.max_attempts) for j in jobs],
        "timeouts": [None if j.timeout_s is None else float(j.timeout_s) for j in jobs],
        "keys": [j.key for j in jobs],
        "metas": [_meta_text(j.meta) for j in jobs],
        "channel": channel,
    }


def _meta_text(meta: Mapping[str, Any]) -> str | None:
    return _encoder.encode(meta).decode() if meta else None


def _finish_params(finishes: Sequence[Finish], channel: str) -> dict[str, Any]:
    flat = flatten_outcomes(finishes, time.time())
    return {
        "ords": list(range(len(flat))),
        "ids": [f.job_id for f in flat],
        "tokens": [f.token for f in flat],
        "kinds": [f.kind for f in flat],
        "results": [f.result for f in flat],
        "errors": [None if f.error is None else f.error.decode() for f in flat],
        # a retry's time as a delay: the database adds it to its own clock (skew-proof)
        "delays": [f.delay_s for f in flat],
        "channel": channel,
    }


def _raise_on_batch_duplicates(jobs: Sequence[NewJob]) -> None:
    """With ``on_conflict="raise"``, a key repeated within the batch rejects the batch."""
    first: dict[str, str] = {}
    for j in jobs:
        if j.key is not None:
            if j.key in first:
                raise DuplicateJobError(j.key, first[j.key])
            first[j.key] = j.id


def _caller_connection(connection: Any) -> SyncConn:
    """The psycopg connection behind ``connection=`` (a Connection or a Cursor)."""
    conn = connection.connection if isinstance(connection, psycopg.Cursor) else connection
    if isinstance(conn, psycopg.Connection):
        return conn
    if isinstance(connection, psycopg.AsyncConnection | psycopg.AsyncCursor):
        raise TypeError(
            "connection= takes a synchronous psycopg Connection or Cursor: send() is "
            "synchronous, and asend() has no connection= (it would await on your loop)"
        )
    raise TypeError(
        "the PostgreSQL broker's connection= takes a psycopg (3) Connection or Cursor, not "
        f"{type(connection).__name__}"
    )


@contextlib.contextmanager
def _savepoint(conn: SyncConn) -> Iterator[None]:
    """Undo our rows, and only ours, if the block raises: the caller's transaction goes on."""
    conn.execute("SAVEPOINT taskmill_enqueue")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK TO SAVEPOINT taskmill_enqueue")
        conn.execute("RELEASE SAVEPOINT taskmill_enqueue")
        raise
    conn.execute("RELEASE SAVEPOINT taskmill_enqueue")


# --- wake-ups -----------------------------------------------------------------------------------


class _Listener:
    """``LISTEN`` on a connection of its own, on one event loop, for as long as that loop
    serves claims and waits.

    Notifications are counted as they arrive, whether or not anyone waits, so a job committed
    between a worker's empty claim and its ``wait`` still wakes it: the claim remembers the
    count (``seq``) and the wait compares. A lost connection is re-established with back-off,
    and each (re)connection counts as a wake-up for everyone, since notifications sent while
    nobody listened are gone.
    """

    def __init__(self, conninfo: str, channel: str) -> None:
        self._conninfo = conninfo
        self._channel = channel
        self.seq = 0
        self._reset_seq = 0
        self._due: dict[str, int] = {}  # queue -> seq of its last "work is due" notification
        self._scheduled: deque[tuple[int, str, float]] = deque(maxlen=1024)
        self._changed = asyncio.Event()
        self._listening = asyncio.Event()
        self.ever_listened = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="taskmill-postgres-listen"
            )

    async def listening(self, timeout: float) -> None:
        """Until the first ``LISTEN`` is in place (or ``timeout``: then claims go on, and a
        wake-up counts once it is)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._listening.wait()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        delay = 0.05
        while True:
            try:
                await self._listen()
            except (psycopg.Error, OSError) as exc:
                if self.ever_listened:
                    log.warning("listening for wake-ups failed, reconnecting: %s", exc)
            except Exception:  # a bug of ours: keep listening, workers would otherwise poll
                log.exception("listening for wake-ups failed unexpectedly, reconnecting")
            self._listening.clear()
            self._wake_everyone()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _listen(self) -> None:
        conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
        async with conn:
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
            self._listening.set()
            self.ever_listened = True
            self._wake_everyone()  # what was sent while we were not listening is lost
            async for notify in conn.notifies():
                self._on_notify(notify.payload)

    def _on_notify(self, payload: str) -> None:
        self.seq += 1
        kind, rest = payload[:1], payload[1:]
        if kind == "q":
            self._due[rest] = self.seq
        elif kind == "s":
            delay, _, queue = rest.partition(" ")
            try:
                seconds = max(0.0, float(delay))
            except ValueError:
                seconds = 0.0
            self._scheduled.append((self.seq, queue, time.monotonic() + seconds))
        else:  # not ours to parse: wake up rather than miss work
            self._reset_seq = self.seq
        self._bump()

    def _wake_everyone(self) -> None:
        self.seq += 1
        self._reset_seq = self.seq
        self._bump()

    def _bump(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait(self, queues: Sequence[str], since: int, deadline: float) -> None:
        """Until work for ``queues`` was notified after ``since``, or ``deadline`` (monotonic),
        brought forward by any job of ``queues`` scheduled meanwhile."""
        while True:
            if self._reset_seq > since or any(self._due.get(q, 0) > since for q in queues):
                return
            for seq, queue, due in self._scheduled:
                if seq > since and queue in queues:
                    deadline = min(deadline, due)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await changed.wait()


@dataclass(eq=False)
class _LoopState:
    """What the broker keeps per event loop: a pool, a listener, and the claims' marks."""

    pool: AsyncConnectionPool[AsyncConn]
    listener: _Listener | None = None
    marks: dict[tuple[str, ...], int] = field(default_factory=dict)


_WITH_IO_LOOP: weakref.WeakSet[PostgresBroker] = weakref.WeakSet()
_atexit_registered = False


def _close_io_loops_at_exit() -> None:
    """Close the pools of brokers whose app was never closed: the I/O loop's thread is a
    daemon, and pending pool tasks destroyed at exit would each log an error."""
    for broker in list(_WITH_IO_LOOP):
        broker.close_io_blocking(timeout=2.0)


@contextlib.asynccontextmanager
async def _pipelined_transaction(conn: AsyncConn, *, durable: bool = True) -> AsyncIterator[None]:
    """One transaction in one round trip: ``BEGIN`` and ``COMMIT`` go down the pipeline with
    the statements. (psycopg's ``transaction()`` block syncs the pipeline at its end, a
    second round trip: 0.88 ms against 0.48 ms for a claim, measured.) ``durable=False``
    commits without waiting for the WAL flush, for what a crash may lose safely."""
    try:
        async with conn.pipeline():
            await conn.execute("BEGIN")
            if not durable:
                await conn.execute("SET LOCAL synchronous_commit TO off")
            yield
            await conn.execute("COMMIT")
    except BaseException:
        if not conn.closed and conn.info.transaction_status != TransactionStatus.IDLE:
            with contextlib.suppress(psycopg.Error):
                await conn.execute("ROLLBACK")
        raise


def _consume(task: asyncio.Future[Any]) -> None:
    """Retrieve the outcome of a shielded call nobody awaits any more (no warning)."""
    if not task.cancelled():
        task.exception()


# --- the broker ---------------------------------------------------------------------------------


class PostgresBroker(Broker):
    capabilities = Capabilities(
        shared_across_processes=True,
        server_clock=True,
        transactional_enqueue=True,
        push_wakeups=True,
    )

    def __init__(self, url: str) -> None:
        self.url = url
        self.config = parse_url(url)
        self.schema = self.config.schema
        self.channel = f"{self.schema}_wake"
        self.events_channel = f"{self.schema}_events"
        self._q = queries(self.schema)
        self._reads = frozenset(self._q[name] for name in _READ_QUERIES)
        self._io: Portal | None = None
        self._io_lock = threading.Lock()
        self._loops: dict[asyncio.AbstractEventLoop, _LoopState] = {}
        self._attached: set[asyncio.AbstractEventLoop] = set()
        self._sync_pool: ConnectionPool[SyncConn] | None = None
        self._sync_lock = threading.Lock()
        self._ready = False
        self._ready_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<PostgresBroker {self.config.where} schema={self.schema}>"

    # --- errors and retries ---------------------------------------------------------------

    def _unavailable(self, exc: BaseException, *, writes: bool = True) -> BrokerUnavailableError:
        """``writes``: the call may have changed jobs, so say what a caller may assume."""
        message = (
            f"PostgreSQL at {self.config.where} did not answer within "
            f"{self.config.unavailable_after_s:g} s ({type(exc).__name__}: {exc})"
        )
        if writes:
            message += (
                ". A write that was under way may still have been applied; sending the same "
                "job again is safe (its id is checked)"
            )
        return BrokerUnavailableError(scrub(message, self.url))

    def _refused(self, exc: Exception) -> BrokerError:
        """The server refused: a statement, or (``permanent``: no retry fixes it) the
        connection itself (no such role or database, a bad password, not PostgreSQL)."""
        hint = ""
        if isinstance(exc, psycopg.errors.UndefinedTable | psycopg.errors.InvalidSchemaName):
            hint = f" (are taskmill's tables in schema {self.schema!r}? see `taskmill migrate`)"
        if any(t in str(exc) for t in _NOT_POSTGRES):
            hint = " (is this the port of a PostgreSQL server?)"
        message = scrub(f"PostgreSQL at {self.config.where}: {exc}{hint}".strip(), self.url)
        connection_refused = isinstance(exc, _RETRYABLE) and not _retryable(exc)
        return BrokerError(message, permanent=connection_refused)

    async def _run(self, op: Callable[[AsyncConn], Awaitable[T]], *, writes: bool = True) -> T:
        """``op`` on a pooled connection of the running loop. A lost connection is retried
        with back-off for up to ``unavailable_after_s`` in all: the first retry at once (after
        a restart or ``pg_terminate_backend`` every idle pooled connection is dead, and each
        fails fast), then 50 ms doubling up to 1 s. ``writes=False``: ``op`` only reads."""
        pool = (await self._state()).pool
        deadline = time.monotonic() + self.config.unavailable_after_s
        delay = 0.0

        async def attempt(budget: float) -> T:
            async with pool.connection(timeout=budget) as conn:
                return await op(conn)

        while True:
            budget = max(0.01, deadline - time.monotonic())
            try:
                async with asyncio.timeout(budget):
                    return await attempt(budget)
            except PoolClosed:
                raise BrokerError("the PostgreSQL broker is closed") from None
            except _RETRYABLE as exc:
                if not _retryable(exc):
                    raise self._refused(exc) from exc
                if time.monotonic() + delay >= deadline:
                    raise self._unavailable(exc, writes=writes) from exc
                await asyncio.sleep(delay)
                delay = min(max(delay * 2, 0.05), 1.0)
            except psycopg.Error as exc:
                raise self._refused(exc) from exc

    def _run_blocking(self, op: Callable[[SyncConn, bool], T]) -> T:
        """``op(conn, retried)`` on a connection of the synchronous pool, retried like
        ``_run``. ``retried`` tells a write that an earlier try may have been applied."""
        deadline = time.monotonic() + self.config.unavailable_after_s
        delay = 0.0
        retried = False
        while True:
            budget = max(0.01, deadline - time.monotonic())
            try:
                with self._sync().connection(timeout=budget) as conn:
                    return op(conn, retried)
            except PoolClosed:
                raise BrokerError("the PostgreSQL broker is closed") from None
            except _RETRYABLE as exc:
                if not _retryable(exc):
                    raise self._refused(exc) from exc
                if time.monotonic() + delay >= deadline:
                    raise self._unavailable(exc) from exc
                time.sleep(delay)
                delay = min(max(delay * 2, 0.05), 1.0)
                retried = True
            except psycopg.Error as exc:
                raise self._refused(exc) from exc

    # --- connections ----------------------------------------------------------------------

    def _io_loop(self) -> asyncio.AbstractEventLoop:
        global _atexit_registered
        io = self._io
        if io is None:
            with self._io_lock:  # two threads' first calls must not start two loops
                if self._io is None:
                    self._io = Portal(name="taskmill-postgres-io")
                    _WITH_IO_LOOP.add(self)
                    if not _atexit_registered:
                        atexit.register(_close_io_loops_at_exit)
                        _atexit_registered = True
                io = self._io
        return io.loop

    def close_io_blocking(self, timeout: float) -> None:
        """Close the I/O loop's pool and listener and stop it, from any other thread."""
        io, self._io = self._io, None
        _WITH_IO_LOOP.discard(self)
        if io is not None:
            future = asyncio.run_coroutine_threadsafe(self._close_loop_state(), io.loop)
            with contextlib.suppress(Exception):
                future.result(timeout)
            io.close()

    async def _state(self) -> _LoopState:
        """The running loop's pool (and listener), made on first use."""
        loop = asyncio.get_running_loop()
        state = self._loops.get(loop)
        if state is None:
            pool: AsyncConnectionPool[AsyncConn] = AsyncConnectionPool(
                self.config.conninfo,
                min_size=1,
                max_size=self.config.pool_size,
                kwargs={"autocommit": True},
                open=False,
                name=f"taskmill-{self.schema}",
                timeout=self.config.unavailable_after_s,
            )
            state = self._loops[loop] = _LoopState(pool)
            await pool.open(wait=False)
        return state

    async def _listener(self, state: _LoopState) -> _Listener:
        listener = state.listener
        if listener is None:
            listener = state.listener = _Listener(self.config.conninfo, self.channel)
            listener.start()
        if not listener.ever_listened:
            await listener.listening(min(2.0, self.config.unavailable_after_s))
        return listener

    def _sync(self) -> ConnectionPool[SyncConn]:
        pool = self._sync_pool
        if pool is None:
            with self._sync_lock:
                if self._sync_pool is None:
                    new: ConnectionPool[SyncConn] = ConnectionPool(
                        self.config.conninfo,
                        min_size=1,
                        max_size=self.config.pool_size,
                        kwargs={"autocommit": True},
                        open=False,
                        name=f"taskmill-{self.schema}-sync",
                        timeout=self.config.unavailable_after_s,
                    )
                    new.open(wait=False)
                    self._sync_pool = new
                pool = self._sync_pool
        return pool

    def _connect_blocking(self) -> SyncConn:
        return psycopg.connect(self.config.conninfo, autocommit=True)

    def prepare_blocking(self) -> None:
        """Create or upgrade the schema (or, with ``migrate=false``, check it is there and
        current), once per broker. Retried while the server is unreachable."""
        if self._ready:
            return
        with self._ready_lock:
            if self._ready:
                return
            deadline = time.monotonic() + self.config.unavailable_after_s
            delay = 0.05
            while True:
                try:
                    with self._connect_blocking() as conn:
                        if self.config.migrate:
                            apply_migrations(conn, self.schema)
                        else:
                            self._check_schema(conn)
                    break
                except _RETRYABLE as exc:
                    if not _retryable(exc):
                        raise self._refused(exc) from exc
                    if time.monotonic() + delay >= deadline:
                        raise self._unavailable(exc, writes=False) from exc
                    time.sleep(delay)
                    delay = min(delay * 2, 1.0)
                except psycopg.Error as exc:
                    raise self._refused(exc) from exc
            self._ready = True

    def _check_schema(self, conn: SyncConn) -> None:
        version = schema_version(conn, self.schema)
        latest = migrations()[-1].version
        how = (
            "run `taskmill migrate --url URL` (with this URL) to create or upgrade it, or "
            "drop migrate=false from the URL to let taskmill do it on first use"
        )
        if version is None:
            raise BrokerError(
                f"PostgreSQL at {self.config.where} has no taskmill schema {self.schema!r} and "
                f"the URL says migrate=false: {how}"
            )
        if version < latest:
            raise BrokerError(
                f"PostgreSQL schema {self.schema!r} at {self.config.where} is at version "
                f"{version}, this taskmill needs {latest}, and the URL says migrate=false: {how}"
            )

    def migrate_blocking(self, target: int | None = None) -> list[Migration]:
        """Apply the migrations this schema lacks (up to ``target``); what was applied. What
        ``taskmill migrate`` runs; works whatever the URL's ``migrate`` option says."""
        try:
            with self._connect_blocking() as conn:
                applied = apply_migrations(conn, self.schema, target)
        except _RETRYABLE as exc:
            unavailable = self._unavailable(exc, writes=False)
            raise (unavailable if _retryable(exc) else self._refused(exc)) from exc
        except psycopg.Error as exc:
            raise self._refused(exc) from exc
        if target is None:
            self._ready = True
        return applied

    def schema_version_blocking(self) -> int | None:
        """The schema's migration version; None if taskmill's tables are not there."""
        try:
            with self._connect_blocking() as conn:
                return schema_version(conn, self.schema)
        except _RETRYABLE as exc:
            unavailable = self._unavailable(exc, writes=False)
            raise (unavailable if _retryable(exc) else self._refused(exc)) from exc
        except psycopg.Error as exc:
            raise self._refused(exc) from exc

    async def open(self) -> None:
        if not self._ready:
            await asyncio.to_thread(self.prepare_blocking)

    async def close(self) -> None:
        await self.detach()
        if self._io is not None:
            await asyncio.to_thread(self.close_io_blocking, 10.0)
        if self._sync_pool is not None:
            pool, self._sync_pool = self._sync_pool, None
            await asyncio.to_thread(pool.close)

    async def _close_loop_state(self) -> None:
        state = self._loops.pop(asyncio.get_running_loop(), None)
        if state is not None:
            if state.listener is not None:
                await state.listener.close()
            await state.pool.close()

    async def attach(self) -> None:
        self._attached.add(asyncio.get_running_loop())

    async def detach(self) -> None:
        loop = asyncio.get_running_loop()
        if loop in self._attached:
            self._attached.discard(loop)
            await self._close_loop_state()

    # --- producers ------------------------------------------------------------------------

    async def enqueue(
        self, jobs: Sequence[NewJob], *, on_conflict: OnConflict = "return"
    ) -> EnqueueResult:
        # the same code as send(), on a thread: one implementation of the key races
        return await asyncio.to_thread(self.enqueue_blocking, jobs, on_conflict=on_conflict)

    def enqueue_blocking(
        self,
        jobs: Sequence[NewJob],
        *,
        on_conflict: OnConflict = "return",
        connection: Any = None,
    ) -> EnqueueResult:
        if on_conflict == "raise":
            _raise_on_batch_duplicates(jobs)
        self.prepare_blocking()
        if connection is not None:
            return self._enqueue_in_transaction(_caller_connection(connection), jobs, on_conflict)

        def op(conn: SyncConn, retried: bool) -> EnqueueResult:
            atomic = on_conflict == "raise" and any(j.key is not None for j in jobs)
            with conn.transaction() if atomic else contextlib.nullcontext():
                return self._store(conn, jobs, on_conflict, check_stored=retried)

        return self._run_blocking(op)

    def _enqueue_in_transaction(
        self, conn: SyncConn, jobs: Sequence[NewJob], on_conflict: OnConflict
    ) -> EnqueueResult:
        """Insert on the caller's connection, inside the caller's transaction: the rows and
        their wake-up (NOTIFY is transactional) exist once, and only if, it commits."""
        status = conn.info.transaction_status
        if status == TransactionStatus.INERROR:
            raise BrokerError(
                "connection= is in a failed transaction (an earlier statement raised): roll "
                "it back first; nothing was enqueued"
            )
        if conn.autocommit and status == TransactionStatus.IDLE:
            raise ConfigurationError(
                "connection= is in autocommit mode with no open transaction, so the job "
                "would not be tied to anything: send inside `with conn.transaction():`"
            )
        atomic = on_conflict == "raise" and any(j.key is not None for j in jobs)
        try:
            with _savepoint(conn) if atomic else contextlib.nullcontext():
                return self._store(conn, jobs, on_conflict, check_stored=False)
        except psycopg.OperationalError as exc:
            raise BrokerUnavailableError(
                f"PostgreSQL at {self.config.where} (your connection): {exc}"
            ) from exc
        except psycopg.Error as exc:
            raise self._refused(exc) from exc

    def _store(
        self, conn: SyncConn, jobs: Sequence[NewJob], on_conflict: OnConflict, check_stored: bool
    ) -> EnqueueResult:
        """Insert the batch; a job whose key a pending job holds maps to that job
        (``"return"``) or rejects the batch (``"raise"``; the caller rolls back).

        ``check_stored``: an earlier try may have committed before its reply was lost, so
        first skip the jobs whose id is already stored (the batch's insert is atomic)."""
        result = EnqueueResult(ids=[j.id for j in jobs])
        todo = list(range(len(jobs)))
        if check_stored:
            stored = {
                row[0] for row in conn.execute(self._q["stored_ids"], {"ids": [j.id for j in jobs]})
            }
            todo = [i for i in todo if jobs[i].id not in stored]
        for _ in range(_KEY_RACE_TRIES):
            if not todo:
                return result
            batch = [jobs[i] for i in todo]
            query = self._q["enqueue_one" if len(batch) == 1 else "enqueue_many"]
            row = conn.execute(query, _enqueue_params(batch, self.channel)).fetchone()
            stored_keyed = set(row[0]) if row is not None else set()
            stored_before: set[str] = set()
            if row is not None and row[2] < len(batch):  # some ids or keys were taken
                ids = [j.id for j in batch]
                found = conn.execute(self._q["stored_before"], {"ids": ids, "at": row[3]})
                stored_before = {r[0] for r in found}
            for i in todo:
                if jobs[i].id in stored_before:  # the same job, stored already
                    result.existing.add(i)
            missing = [
                i
                for i in todo
                if jobs[i].key is not None
                and jobs[i].id not in stored_keyed
                and jobs[i].id not in stored_before
            ]
            todo = self._resolve_conflicts(conn, jobs, missing, on_conflict, result)
        raise BrokerError(
            f"could not store jobs {[jobs[i].id for i in todo]}: their unique keys' holders "
            f"kept finishing and reappearing ({_KEY_RACE_TRIES} tries)"
        )

    def _resolve_conflicts(
        self,
        conn: SyncConn,
        jobs: Sequence[NewJob],
        missing: list[int],
        on_conflict: OnConflict,
        result: EnqueueResult,
    ) -> list[int]:
        """Point each position in ``missing`` at the pending job holding its key; the
        positions whose holder has finished since (to insert again)."""
        if not missing:
            return []
        keys = sorted({k for i in missing if (k := jobs[i].key) is not None})
        rows = conn.execute(self._q["pending_by_key"], {"keys": keys}).fetchall()
        holders: dict[str, str] = dict(rows)
        again = []
        for i in missing:
            key = jobs[i].key
            assert key is not None
            holder = holders.get(key)
            if holder is None:
                again.append(i)
            elif on_conflict == "raise":
                raise DuplicateJobError(key, holder)
            else:
                result.ids[i] = holder
                result.existing.add(i)
        return again

    # --- workers --------------------------------------------------------------------------

    async def claim(
        self, queues: Sequence[str], limit: int, worker_id: str, lease_s: float
    ) -> list[Job]:
        return (await self.finish_and_claim((), queues, limit, worker_id, lease_s))[1]

    @on_io_loop
    async def finish_and_claim(
        self,
        finishes: Sequence[Finish],
        queues: Sequence[str],
        limit: int,
        worker_id: str,
        lease_s: float,
    ) -> tuple[list[bool], list[Job]]:
        state = await self._state()
        # listen before the claim: a job committed after it must wake the wait that follows
        listener = await self._listener(state)
        mark = listener.seq
        q = self._q
        finish = _finish_params(finishes, self.channel) if finishes else None
        claim = {
            "queues": list(queues),
            "limit": limit,
            "token": os.urandom(8).hex(),
            "lease_s": lease_s,
            "worker_id": worker_id,
        }

        async def op(conn: AsyncConn) -> tuple[set[int], list[TupleRow]]:
            # one transaction, one round trip: outcomes, promotion of due jobs, the claim. A
            # claim alone need not wait for the WAL flush: if a crash loses it, the job is
            # queued again and the claimant's finish is fenced out (at least once, as ever)
            async with _pipelined_transaction(conn, durable=finish is not None):
                finished = await conn.execute(q["finish"], finish) if finish else None
                await conn.execute(q["promote_due"], {"channel": self.channel})
                claimed = await conn.execute(q["claim"], claim)
            applied = {r[0] for r in await finished.fetchall()} if finished else set()
            return applied, await claimed.fetchall()

        applied, rows = await self._run(op)
        state.marks[tuple(queues)] = mark
        rows.sort(key=lambda r: (-r[6], r[9], r[0]))  # priority desc, run_at, enqueue order
        return [i in applied for i in range(len(finishes))], [job_from_row(r[1:]) for r in rows]

    @on_io_loop
    async def heartbeat(
        self, worker: WorkerInfo, claims: Sequence[Claim], lease_s: float
    ) -> HeartbeatReply:
        q = self._q
        extend = {
            "ids": [c.job_id for c in claims],
            "tokens": [c.token for c in claims],
            "lease_s": lease_s,
        }
        me = {
            "id": worker.id,
            "host": worker.host,
            "pid": worker.pid,
            "queues": list(worker.queues),
            "concurrency": worker.concurrency,
            "started_at": worker.started_at,
            "running": list(worker.running),
            "processed": worker.processed,
            "failed": worker.failed,
        }

        async def op(conn: AsyncConn) -> list[TupleRow]:
            async with _pipelined_transaction(conn):
                held = await conn.execute(q["extend_leases"], extend) if claims else None
                await conn.execute(q["upsert_worker"], me)
            return await held.fetchall() if held is not None else []

        rows = await self._run(op)
        held: dict[str, bool] = dict(rows)
        return HeartbeatReply(
            lost={c.job_id for c in claims if c.job_id not in held},
            cancel_requested={job_id for job_id, cancel in held.items() if cancel},
        )

    @on_io_loop
    async def finish(self, finishes: Sequence[Finish]) -> list[bool]:
        if not finishes:
            return []
        params = _finish_params(finishes, self.channel)
        rows = await self._fetch(self._q["finish"], params)
        applied = {r[0] for r in rows}
        return [i in applied for i in range(len(finishes))]

    @on_io_loop
    async def record_progress(self, items: Sequence[Progress]) -> None:
        if not items:
            return
        params = {
            "ids": [p.claim.job_id for p in items],
            "tokens": [p.claim.token for p in items],
            "fractions": [p.fraction for p in items],
            "messages": [p.message for p in items],
        }
        await self._execute(self._q["progress"], params)

    @on_io_loop
    async def recover(self, max_lost_leases: int) -> list[tuple[str, JobState]]:
        params = {
            "max_lost_leases": max_lost_leases,
            "channel": self.channel,
            "error_type": RECOVERED_ERROR_TYPE,
            "message": RECOVERED_MESSAGE,
        }
        rows = await self._fetch(self._q["recover"], params)
        return [(r[0], JobState(r[1])) for r in rows]

    @on_io_loop
    async def wait(
        self, queues: Sequence[str], timeout: float, handover: HandOver | None = None
    ) -> list[Job]:
        # no hand-overs: a woken worker claims with SKIP LOCKED like everyone else
        state = await self._state()
        listener = await self._listener(state)
        since = state.marks.pop(tuple(queues), listener.seq)
        deadline = time.monotonic() + timeout
        # shielded: a worker cancels its wait when a job ends; a query cut off mid-flight
        # would make psycopg cancel it on the server, a connection of its own for nothing
        call = asyncio.ensure_future(self._fetch(self._q["next_due"], {"queues": list(queues)}))
        call.add_done_callback(_consume)
        rows = await asyncio.shield(call)
        due_in = rows[0][0] if rows else None
        if due_in is not None:
            deadline = min(deadline, time.monotonic() + max(0.0, due_in))
        await listener.wait(queues, since, deadline)
        return []

    @on_io_loop
    async def unregister_worker(self, worker_id: str) -> None:
        await self._execute(self._q["delete_worker"], {"id": worker_id})

    @on_io_loop
    async def prune(self, finished_before: float, limit: int = 1000) -> int:
        q = self._q

        async def op(conn: AsyncConn) -> int:
            async with conn.pipeline():
                deleted = await conn.execute(
                    q["prune"], {"before": finished_before, "limit": limit}
                )
                await conn.execute(q["prune_workers"])
                await conn.execute(q["prune_workflows"], {"before": finished_before})
            return deleted.rowcount

        return await self._run(op)

    # --- inspection and management ----------------------------------------------------------

    async def _fetch(self, query: str, params: dict[str, Any] | None = None) -> list[TupleRow]:
        async def op(conn: AsyncConn) -> list[TupleRow]:
            return await (await conn.execute(query, params)).fetchall()

        return await self._run(op, writes=query not in self._reads)

    async def _execute(self, query: str, params: dict[str, Any] | None = None) -> int:
        async def op(conn: AsyncConn) -> int:
            return (await conn.execute(query, params)).rowcount

        return await self._run(op)

    @on_io_loop
    async def now(self) -> float:
        return float((await self._fetch(self._q["now"]))[0][0])

    @on_io_loop
    async def get(self, job_id: str) -> Job | None:
        rows = await self._fetch(self._q["get"], {"id": job_id})
        return job_from_row(rows[0][1:]) if rows else None

    @on_io_loop
    async def get_many(self, job_ids: Sequence[str]) -> list[Job | None]:
        if not job_ids:
            return []
        rows = await self._fetch(self._q["get_many"], {"ids": list(dict.fromkeys(job_ids))})
        found = {row[1]: job_from_row(row[1:]) for row in rows}
        return [found.get(job_id) for job_id in job_ids]

    @on_io_loop
    async def find_jobs(
        self, query: JobQuery, *, limit: int = 100, cursor: str | None = None, count: bool = False
    ) -> JobPage:
        filters = {
            "states": sorted(s.value for s in query.states),
            "queue": query.queue,
            "task": query.task,
            "meta": _encoder.encode(dict(query.meta)).decode() if query.meta else None,
        }
        page = {**filters, "limit": limit + 1, "after": None, "after_at": None}
        if query.order == "finished":
            if cursor is not None:
                page["after_at"], page["after"] = decode_cursor(cursor, "finished", (str, int))
            listing = self._q["find_jobs_finished"]
        else:
            if cursor is not None:
                (page["after"],) = decode_cursor(cursor, "enqueued", (int,))
            listing = self._q["find_jobs_enqueued"]
        q = self._q

        async def op(conn: AsyncConn) -> tuple[list[TupleRow], int | None]:
            # one round trip, one snapshot: the count is of the data the page was read from
            async with _pipelined_transaction(conn):
                await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                listed = await conn.execute(listing, page)
                counted = await conn.execute(q["count_jobs"], filters) if count else None
            total = await counted.fetchone() if counted is not None else None
            return await listed.fetchall(), None if total is None else int(total[0])

        rows, total = await self._run(op)
        next_cursor = None
        if len(rows) > limit:
            last = rows[limit - 1]
            position = (last[-1], last[0]) if query.order == "finished" else (last[0],)
            next_cursor = encode_cursor(query.order, *position)
        return JobPage([job_from_row(r[1:25]) for r in rows[:limit]], next_cursor, total)

    @on_io_loop
    async def stats(self) -> list[QueueStats]:
        by_queue: dict[str, QueueStats] = {}

        def of(queue: str) -> QueueStats:
            if queue not in by_queue:
                by_queue[queue] = QueueStats(queue=queue, counts={s.value: 0 for s in JobState})
            return by_queue[queue]

        for kind, queue, job_state, value in await self._fetch(self._q["stats"]):
            stats = of(queue)
            if kind == "count":
                stats.counts[job_state] = int(value)
            elif kind == "oldest":
                stats.oldest_waiting_s = max(0.0, value)
            else:
                stats.paused = bool(value)
        return [by_queue[q] for q in sorted(by_queue)]

    @on_io_loop
    async def list_workers(self) -> list[WorkerInfo]:
        return [
            WorkerInfo(
                id=r[0],
                host=r[1],
                pid=r[2],
                queues=list(r[3]),
                concurrency=r[4],
                started_at=r[5],
                heartbeat_at=r[6],
                running=list(r[7]),
                processed=r[8],
                failed=r[9],
            )
            for r in await self._fetch(self._q["workers"])
        ]

    @on_io_loop
    async def retry(self, job_ids: Sequence[str] | None) -> list[str]:
        which = self._q["retry_all_failed" if job_ids is None else "retry_ids"]
        query = self._q["retry"].replace("{which}", which)
        params = {"ids": list(job_ids or ()), "channel": self.channel}

        async def op(conn: AsyncConn) -> list[str] | None:
            try:
                return [r[0] for r in await (await conn.execute(query, params)).fetchall()]
            except psycopg.errors.UniqueViolation:
                # a send took one of the keys between our check and our update: try again
                return None

        for _ in range(_KEY_RACE_TRIES):
            ids = await self._run(op)
            if ids is not None:
                return ids
        return []

    @on_io_loop
    async def cancel(self, job_id: str) -> JobState | None:
        rows = await self._fetch(self._q["cancel"], {"id": job_id})
        return JobState(rows[0][0]) if rows else None

    @on_io_loop
    async def run_now(self, job_id: str) -> JobState | None:
        rows = await self._fetch(self._q["run_now"], {"id": job_id, "channel": self.channel})
        return JobState(rows[0][0]) if rows else None

    @on_io_loop
    async def purge(self, queue: str) -> int:
        return await self._execute(self._q["purge"], {"queue": queue})

    @on_io_loop
    async def pause(self, queue: str, paused: bool) -> None:
        params = {"queue": queue, "paused": paused, "channel": self.channel}
        await self._execute(self._q["pause"], params)

    @on_io_loop
    async def schedule_marks(self) -> dict[str, float]:
        return {name: float(tick) for name, tick in await self._fetch(self._q["schedule_marks"])}

    @on_io_loop
    async def mark_schedules(self, marks: Mapping[str, float]) -> None:
        if marks:
            params = {"names": list(marks), "ticks": list(marks.values())}
            await self._execute(self._q["mark_schedules"], params)

    @on_io_loop
    async def save_workflow(self, workflow_id: str, spec: bytes) -> None:
        await self._execute(self._q["save_workflow"], {"id": workflow_id, "spec": spec})

    @on_io_loop
    async def get_workflow(self, workflow_id: str) -> WorkflowRecord | None:
        rows = await self._fetch(self._q["get_workflow"], {"id": workflow_id})
        if not rows:
            return None
        wf_id, spec, state, created, finished = rows[0]
        return WorkflowRecord(
            wf_id, bytes(spec), state, float(created), float(finished) if finished else None
        )

    @on_io_loop
    async def end_workflow(self, workflow_id: str, state: str) -> bool:
        params = {"id": workflow_id, "state": state}
        return await self._execute(self._q["end_workflow"], params) == 1

    @on_io_loop
    async def running_workflows(self, limit: int = 1000) -> list[str]:
        return [r[0] for r in await self._fetch(self._q["running_workflows"], {"limit": limit})]

    @on_io_loop
    async def reserve_rate_slot(self, bucket: str, interval_s: float) -> float:
        params = {"bucket": bucket, "interval": interval_s}
        rows = await self._fetch(self._q["reserve_rate_slot"], params)
        return max(0.0, float(rows[0][0]))

    @on_io_loop
    async def acquire_slot(self, bucket: str, holder: str, limit: int, ttl_s: float) -> bool:
        q = self._q
        params = {"bucket": bucket, "holder": holder, "limit": limit, "ttl": ttl_s}

        async def op(conn: AsyncConn) -> bool:
            async with _pipelined_transaction(conn):
                await conn.execute(q["lock_slots"], {"lock_class": _SLOT_LOCK, "bucket": bucket})
                held = await conn.execute(q["acquire_slot"], params)
            return bool(await held.fetchall())

        return await self._run(op)

    @on_io_loop
    async def release_slot(self, bucket: str, holder: str) -> None:
        await self._execute(self._q["release_slot"], {"bucket": bucket, "holder": holder})

    @on_io_loop
    async def queue_depth(self, queue: str) -> int:
        return int((await self._fetch(self._q["queue_depth"], {"queue": queue}))[0][0])

    @on_io_loop
    async def publish_events(self, payload: bytes) -> None:
        params = {"channel": self.events_channel, "payload": payload.decode()}
        await self._execute("SELECT pg_notify(%(channel)s, %(payload)s)", params)

    def events_subscription(self) -> Subscription:
        return _PostgresSubscription(self.config.conninfo, self.events_channel)


class _PostgresSubscription(Subscription):
    """``LISTEN`` on a connection of its own, on the subscriber's loop."""

    def __init__(self, conninfo: str, channel: str) -> None:
        self._conninfo = conninfo
        self._channel = channel
        self._conn: psycopg.AsyncConnection[TupleRow] | None = None
        self._notifies: Any = None

    async def start(self) -> None:
        self._conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
        await self._conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
        self._notifies = self._conn.notifies()

    async def get(self) -> bytes:
        assert self._notifies is not None
        notify = await self._notifies.__anext__()
        return str(notify.payload).encode()

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
