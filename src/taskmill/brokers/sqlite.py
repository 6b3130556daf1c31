"""The default broker: one SQLite file in WAL mode, shared by every process on the machine.

Each operation is one short write transaction (``BEGIN IMMEDIATE``) on a connection owned by a
single thread. Async callers reach it through a one-thread executor per broker, so a lock wait
never blocks the event loop; synchronous producers use a connection of their own thread.
Idle workers are woken by Unix datagrams (``taskmill.brokers.wakeup``), with a cheap
``PRAGMA data_version`` check as the fallback for writers that cannot notify (a caller's own
transaction, another tool).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar
from urllib.parse import parse_qsl, urlsplit

import msgspec

from taskmill.brokers._rows import (
    CANCELLED,
    FAILED,
    JOB_COLUMNS,
    RECOVERED_ERROR_TYPE,
    RECOVERED_MESSAGE,
    RETRY,
    SUCCEEDED,
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
from taskmill.brokers.wakeup import WakeListener, WakeSender, channel_dir
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
from taskmill.meta import encode_meta
from taskmill.urls import redact_url

log = logging.getLogger("taskmill.brokers.sqlite")

P = ParamSpec("P")
T = TypeVar("T")

Q = load_queries("sqlite.sql")
EVENTS_KEPT_S = 3600.0
"""Events are a polled table here: kept an hour, so a subscriber that polls late misses none."""
SCHEMA_VERSION = 5
"""2: schedules, 3: workflows and limits, 4: events (versions 1-4 are ``schema_v1``, all IF NOT
EXISTS); 5: job metadata and workers' counters (``schema_v5``, columns added to version 4)."""
COLUMNS = ", ".join(JOB_COLUMNS)
GET_MANY_CHUNK = 500
"""Ids per statement of ``get_many`` (SQLite before 3.32 takes at most 999 parameters)."""
_encoder = msgspec.json.Encoder()


def parse_url(url: str) -> tuple[str, dict[str, str]]:
    """``sqlite:///relative.db`` or ``sqlite:////absolute/path.db`` → (path, options)."""
    shown = redact_url(url)  # for messages: never the password
    parts = urlsplit(url)
    if parts.scheme != "sqlite":
        raise ConfigurationError(f"not a sqlite URL: {shown!r}")
    path = parts.path
    if not url.split(":", 1)[1].startswith("//"):
        # sqlite:/x.db would read as ./x.db or as /x.db depending on whom you ask: ask again
        name = path.lstrip("/")
        raise ConfigurationError(
            f"sqlite URL {shown!r} needs // after 'sqlite:': write sqlite:///{name} for "
            f"{name} in the working directory, or sqlite:////{name} for the absolute path /{name}"
        )
    if parts.netloc:
        raise ConfigurationError(
            f"sqlite URL {shown!r} has a host; use sqlite:///relative.db or sqlite:////abs.db"
        )
    path = path[1:] if path.startswith("/") else path
    if not path or path == ":memory:":
        raise ConfigurationError(
            f"sqlite URL {shown!r} names no file; workers in other processes need a shared file "
            "(use memory:// for tests)"
        )
    return path, dict(parse_qsl(parts.query))


def _int_option(options: dict[str, str], name: str, default: int, url: str) -> int:
    raw = options.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ConfigurationError(
            f"{name} in {redact_url(url)!r} must be a whole number >= 0, not {raw!r}"
        )
    return value


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc)
    return "locked" in text or "busy" in text


def _all(conditions: list[str]) -> str:
    return " AND ".join(conditions) or "1"


def _filters(query: JobQuery) -> tuple[list[str], list[Any]]:
    """A query's filters as SQL conditions and their parameters."""
    where: list[str] = []
    params: list[Any] = []
    if query.order == "finished":  # the partial index's own condition, so it can be used
        where.append("state IN ('succeeded', 'failed', 'cancelled')")
    if query.states:
        where.append(f"state IN ({','.join('?' * len(query.states))})")
        params += sorted(s.value for s in query.states)
    if query.queue is not None:
        where.append("queue = ?")
        params.append(query.queue)
    if query.task is not None:
        where.append("substr(task, 1, ?) = ?")
        params += (len(query.task), query.task)
    for key, value in query.meta.items():
        path = f'$."{key}"'  # keys are checked: no quotes in them
        if value is None or isinstance(value, bool):
            where.append("json_type(meta, ?) = ?")
            params += (path, "null" if value is None else str(value).lower())
        elif isinstance(value, str):
            where.append("json_type(meta, ?) = 'text' AND json_extract(meta, ?) = ?")
            params += (path, path, value)
        else:
            where.append("json_type(meta, ?) IN ('integer', 'real') AND json_extract(meta, ?) = ?")
            params += (path, path, value)
    return where, params


class SQLiteBroker(Broker):
    capabilities = Capabilities(
        shared_across_processes=True,
        server_clock=False,
        transactional_enqueue=True,
        push_wakeups=True,
    )

    def __init__(self, url: str) -> None:
        self.url = url
        self.path, options = parse_url(url)
        unknown = set(options) - {"busy_timeout_ms", "synchronous", "poll_ms"}
        if unknown:
            raise ConfigurationError(
                f"unknown sqlite URL option(s) {sorted(unknown)}; "
                "known: busy_timeout_ms, synchronous, poll_ms"
            )
        self.busy_timeout_ms = _int_option(options, "busy_timeout_ms", 5000, url)
        self.synchronous = options.get("synchronous", "normal").upper()
        if self.synchronous not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
            raise ConfigurationError(
                f"synchronous must be off/normal/full/extra, not {redact_url(url)!r}"
            )
        self.poll_s = _int_option(options, "poll_ms", 200, url) / 1000
        self._local = threading.local()
        self._generation = 0
        self._inode: int | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._opened = False
        self._open_lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._wake_dir = channel_dir(self.path)
        self._sender: WakeSender | None = None
        self._listener: WakeListener | None = None
        self._claim_sql: dict[int, str] = {}
        # every thread's connection, so close() can close the ones of producer threads too
        self._conns: set[sqlite3.Connection] = set()
        self._conns_lock = threading.Lock()
        # commits on this process's own connection do not change its PRAGMA data_version, so
        # wait() also watches this count of our own writes that may schedule work
        self._own_writes = 0

    # --- connections ----------------------------------------------------------------------

    def _connect(self, busy_timeout_ms: int = 0) -> sqlite3.Connection:
        # Working connections have no SQLite busy handler: its sleeps start at 1 ms and grow,
        # far longer than our transactions last, so two busy workers would mostly sleep.
        # ``_begin`` retries on a finer schedule instead. WAL readers never wait for writers.
        conn = sqlite3.connect(
            self.path,
            timeout=self.busy_timeout_ms / 1000,
            isolation_level=None,
            check_same_thread=False,
        )
        # Opening reads the schema, which waits out another connection's close (the last one
        # to close checkpoints the WAL under an exclusive lock); only then drop the handler.
        conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        conn.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
        with self._conns_lock:
            self._conns.add(conn)
        return conn

    def _begin(self, conn: sqlite3.Connection) -> None:
        """``BEGIN IMMEDIATE``, retried every 50 µs-2 ms until ``busy_timeout_ms``."""
        try:
            conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc):
                raise
        deadline = time.monotonic() + self.busy_timeout_ms / 1000
        delay = 50e-6
        while True:
            time.sleep(delay)
            try:
                conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or time.monotonic() > deadline:
                    raise
            delay = min(delay * 1.5, 0.002)

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection; reopened if the file was deleted or replaced under us."""
        local = self._local
        conn: sqlite3.Connection | None = getattr(local, "conn", None)
        try:
            inode = os.stat(self.path).st_ino
        except FileNotFoundError:
            inode = None
        if inode is None or inode != self._inode:
            with self._open_lock:
                if inode is None or inode != self._inode:
                    if self._inode is not None:
                        log.error(
                            "SQLite file %s was deleted or replaced under this process; "
                            "reopening it (jobs stored in the old file are gone with it)",
                            self.path,
                        )
                    self._setup_file()
                    self._generation += 1
        if conn is None or local.generation != self._generation:
            if conn is not None:
                conn.close()
                with self._conns_lock:
                    self._conns.discard(conn)
            conn = self._connect()
            local.conn = conn
            local.generation = self._generation
        return conn

    def _directory(self) -> str:
        return os.path.dirname(os.path.abspath(self.path))

    def _setup_file(self) -> None:
        """Create the schema (idempotent) and switch the file to WAL. Caller holds the lock."""
        directory = self._directory()
        if not os.path.isdir(directory):
            raise BrokerError(
                f"cannot open SQLite database {self.path}: {directory} does not exist",
                permanent=True,
            )
        with self._errors():
            conn = self._connect(self.busy_timeout_ms)
            try:
                # when two processes create the file at once, switching it to WAL fails with
                # "locked" at once (no busy handler on that path): retry within the busy timeout
                deadline = time.monotonic() + self.busy_timeout_ms / 1000
                while True:
                    try:
                        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                        break
                    except sqlite3.OperationalError as exc:
                        if "locked" not in str(exc) or time.monotonic() > deadline:
                            raise
                        time.sleep(0.005)
                if mode != "wal":
                    raise BrokerError(f"SQLite database {self.path} could not switch to WAL mode")
                (version,) = conn.execute("PRAGMA user_version").fetchone()
                if version < SCHEMA_VERSION:
                    self._upgrade(conn)
            finally:
                conn.close()
        self._inode = os.stat(self.path).st_ino

    @staticmethod
    def _upgrade(conn: sqlite3.Connection) -> None:
        """Bring the schema to ``SCHEMA_VERSION``: what a fresh file gets is what an old one
        gets, step by step. The version is read again under the write lock: another process
        may have upgraded the file since."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            steps = [(4, "schema_v1"), (5, "schema_v5")]
            for target, name in steps:
                if version < target:
                    script = "\n".join(
                        line for line in Q[name].splitlines() if not line.startswith("--")
                    )
                    for statement in script.split(";"):
                        if statement.strip():
                            conn.execute(statement)
            if version < SCHEMA_VERSION:
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.OperationalError as exc:
            text = str(exc)
            if "locked" in text or "busy" in text:
                raise BrokerUnavailableError(
                    f"SQLite database {self.path} stayed locked for more than "
                    f"{self.busy_timeout_ms} ms ({text}); nothing was written"
                ) from exc
            if "readonly" in text or "read-only" in text:
                # SQLite keeps a connection opened on a read-only file read-only for good:
                # drop it, so a retry after the file is writable again reopens it writable
                self._close_thread()
                raise BrokerError(
                    f"SQLite database {self.path} is read-only ({text}); nothing was written",
                    permanent=True,
                ) from exc
            if "unable to open" in text and not os.access(self._directory(), os.W_OK):
                raise BrokerError(
                    f"SQLite database {self.path}: directory {self._directory()} is not "
                    "writable: SQLite needs to create the -wal and -shm files beside the "
                    f"database ({text})",
                    permanent=True,
                ) from exc
            if "unable to open" in text or "disk I/O" in text:
                raise BrokerUnavailableError(f"SQLite database {self.path}: {text}") from exc
            raise BrokerError(f"SQLite database {self.path}: {text}") from exc
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.IntegrityError):
                raise
            raise BrokerError(f"SQLite database {self.path}: {exc}") from exc

    @contextlib.contextmanager
    def _write(self, conn: sqlite3.Connection | None = None) -> Iterator[sqlite3.Connection]:
        with self._errors():
            conn = conn or self._conn()
            self._begin(conn)
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _read(self) -> sqlite3.Connection:
        return self._conn()

    async def _run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        if self._executor is None:
            raise BrokerError("the SQLite broker is not open")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    async def open(self) -> None:
        self.open_blocking()

    def open_blocking(self) -> None:
        with self._start_lock:
            if self._opened:
                return
            with self._errors():
                self._conn()
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="taskmill-sqlite")
            self._sender = WakeSender(self._wake_dir)
            self._opened = True

    async def close(self) -> None:
        if self._executor is not None:
            executor, self._executor = self._executor, None
            await asyncio.get_running_loop().run_in_executor(executor, self._close_thread)
            executor.shutdown(wait=True)
        self._close_thread()
        with self._conns_lock:
            others, self._conns = list(self._conns), set()
        for conn in others:  # producer threads' connections: sqlite3 allows a close from here
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self._generation += 1  # a thread that sends again reconnects
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._sender is not None:
            self._sender.close()
            self._sender = None
        self._opened = False

    def _close_thread(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _notify(self) -> None:
        if self._sender is not None:
            self._sender.notify()

    # --- producers ------------------------------------------------------------------------

    async def enqueue(
        self, jobs: Sequence[NewJob], *, on_conflict: OnConflict = "return"
    ) -> EnqueueResult:
        return await self._run(self._enqueue, jobs, on_conflict, None)

    def enqueue_blocking(
        self,
        jobs: Sequence[NewJob],
        *,
        on_conflict: OnConflict = "return",
        connection: Any = None,
    ) -> EnqueueResult:
        if not self._opened:
            self.open_blocking()
        return self._enqueue(jobs, on_conflict, connection)

    def _enqueue(
        self, jobs: Sequence[NewJob], on_conflict: OnConflict, connection: Any
    ) -> EnqueueResult:
        now = time.time()
        result = EnqueueResult(ids=[j.id for j in jobs])
        plain: list[tuple[Any, ...]] = []
        keyed: list[tuple[int, tuple[Any, ...]]] = []
        due = False
        for i, j in enumerate(jobs):
            run_at = j.run_at if j.run_at is not None else now + j.delay_s
            queued = run_at <= now
            due = due or queued
            row = (
                j.id,
                j.task,
                j.queue,
                "queued" if queued else "scheduled",
                j.payload,
                j.priority,
                j.max_attempts,
                run_at,
                now,
                j.timeout_s,
                encode_meta(j.meta),
                j.key,
            )
            if j.key is None:
                plain.append(row)
            else:
                keyed.append((i, row))
        if connection is not None:
            conn = connection.connection if isinstance(connection, sqlite3.Cursor) else connection
            if not isinstance(conn, sqlite3.Connection):
                raise TypeError(
                    "connection= takes a sqlite3.Connection or Cursor on the broker's own file"
                )
            self._check_same_file(conn)
            with self._errors():
                self._insert(conn, plain, keyed, result, on_conflict)
        else:
            with self._write() as conn:
                self._insert(conn, plain, keyed, result, on_conflict)
        self._own_writes += 1
        if due:
            self._notify()
        return result

    def _check_same_file(self, conn: sqlite3.Connection) -> None:
        with self._errors():
            files = {row[2] for row in conn.execute("PRAGMA database_list") if row[1] == "main"}
        ours = os.path.realpath(self.path)
        if not any(f and os.path.realpath(f) == ours for f in files):
            raise BrokerError(
                f"connection= is open on {sorted(files) or ['an in-memory database']}, not on "
                f"this broker's file {ours}: the job would be stored where no worker looks"
            )

    @staticmethod
    def _insert(
        conn: sqlite3.Connection,
        plain: list[tuple[Any, ...]],
        keyed: list[tuple[int, tuple[Any, ...]]],
        result: EnqueueResult,
        on_conflict: OnConflict,
    ) -> None:
        if plain:
            before = conn.total_changes
            conn.executemany(Q["insert"], plain)
            if conn.total_changes - before < len(plain):  # some ids were stored already
                SQLiteBroker._mark_stored_before(conn, plain, result)
        for i, row in keyed:
            if conn.execute(Q["insert"], row).rowcount == 0:
                if conn.execute(Q["job_exists"], (row[0],)).fetchone() is not None:
                    result.existing.add(i)  # this very job is stored already
                    continue
                key = row[-1]
                existing = conn.execute(Q["pending_by_key"], (key,)).fetchone()
                if existing is None:
                    raise BrokerError(f"job {row[0]} was not stored, and no job holds its key")
                if on_conflict == "raise":
                    raise DuplicateJobError(key, existing[0])
                result.ids[i] = existing[0]
                result.existing.add(i)

    @staticmethod
    def _mark_stored_before(
        conn: sqlite3.Connection, plain: list[tuple[Any, ...]], result: EnqueueResult
    ) -> None:
        """Find the rows ``INSERT OR IGNORE`` skipped: those stored with another enqueue
        time than this batch's (a row's id, task, payload and time are what this call wrote)."""
        seen: set[str] = set()
        for i, job_id in enumerate(result.ids):
            if job_id in seen:  # the batch names one job twice: stored once
                result.existing.add(i)
            seen.add(job_id)
        position = {job_id: i for i, job_id in reversed(list(enumerate(result.ids)))}
        for row in plain:
            stored = conn.execute(Q["stored_enqueued_at"], (row[0],)).fetchone()
            if stored is not None and stored[0] != row[8]:
                result.existing.add(position[row[0]])

    # --- workers --------------------------------------------------------------------------

    async def claim(
        self, queues: Sequence[str], limit: int, worker_id: str, lease_s: float
    ) -> list[Job]:
        if self._listener is None:
            # listen before the first claim, so a notify after an empty claim is not missed
            self._listener = WakeListener(self._wake_dir)
        return await self._run(self._claim, queues, limit, worker_id, lease_s)

    def _claim_statement(self, n_queues: int) -> str:
        sql = self._claim_sql.get(n_queues)
        if sql is None:
            one = Q["candidates"]
            if n_queues == 1:
                candidates = one.replace("SELECT seq, priority, run_at", "SELECT seq")
            else:
                union = " UNION ALL ".join(f"SELECT * FROM ({one})" for _ in range(n_queues))
                candidates = (
                    f"SELECT seq FROM ({union}) ORDER BY priority DESC, run_at, seq LIMIT ?"
                )
            sql = Q["claim"].format(candidates=candidates, columns="seq, " + COLUMNS)
            self._claim_sql[n_queues] = sql
        return sql

    async def finish_and_claim(
        self,
        finishes: Sequence[Finish],
        queues: Sequence[str],
        limit: int,
        worker_id: str,
        lease_s: float,
    ) -> tuple[list[bool], list[Job]]:
        if self._listener is None:
            self._listener = WakeListener(self._wake_dir)
        return await self._run(self._finish_and_claim, finishes, queues, limit, worker_id, lease_s)

    def _finish_and_claim(
        self,
        finishes: Sequence[Finish],
        queues: Sequence[str],
        limit: int,
        worker_id: str,
        lease_s: float,
    ) -> tuple[list[bool], list[Job]]:
        applied: list[bool] = []
        jobs = self._claim(queues, limit, worker_id, lease_s, finishes, applied)
        return applied, jobs

    def _claim(
        self,
        queues: Sequence[str],
        limit: int,
        worker_id: str,
        lease_s: float,
        finishes: Sequence[Finish] = (),
        applied: list[bool] | None = None,
    ) -> list[Job]:
        self._data_changed()  # the baseline for wait(): any commit after this wakes it
        now = time.time()
        token = os.urandom(8).hex()
        notify = False
        with self._write() as c:
            if finishes:
                assert applied is not None
                notify = self._apply_finishes(c, finishes, now, applied)
            c.execute(Q["promote_due"], (now,))
            paused = {r[0] for r in c.execute(Q["paused_queues"])}
            active = [q for q in queues if q not in paused] if paused else list(queues)
            if not active:
                rows = []
            else:
                rows = self._claim_rows(c, active, limit, token, now + lease_s, worker_id, now)
        if notify:
            self._notify()
        rows.sort(key=lambda r: (-r[6], r[9], r[0]))  # priority desc, run_at, enqueue order
        return [job_from_row(r[1:]) for r in rows]

    def _claim_rows(
        self,
        c: sqlite3.Connection,
        active: list[str],
        limit: int,
        token: str,
        expires: float,
        worker_id: str,
        now: float,
    ) -> list[Any]:
        params: list[Any] = [token, expires, worker_id, now]
        for q in active:
            params += (q, limit)
        if len(active) > 1:
            params.append(limit)
        return c.execute(self._claim_statement(len(active)), params).fetchall()

    async def heartbeat(
        self, worker: WorkerInfo, claims: Sequence[Claim], lease_s: float
    ) -> HeartbeatReply:
        return await self._run(self._heartbeat, worker, claims, lease_s)

    def _heartbeat(
        self, worker: WorkerInfo, claims: Sequence[Claim], lease_s: float
    ) -> HeartbeatReply:
        now = time.time()
        reply = HeartbeatReply()
        with self._write() as c:
            if claims:
                expires = now + lease_s
                c.executemany(Q["extend_lease"], [(expires, cl.job_id, cl.token) for cl in claims])
                held: dict[str, tuple[str | None, str, int]] = {}
                for start in range(0, len(claims), 500):
                    ids = [cl.job_id for cl in claims[start : start + 500]]
                    sql = Q["held_leases"].format(ids=",".join("?" * len(ids)))
                    for job_id, token, state, cancel in c.execute(sql, ids):
                        held[job_id] = (token, state, cancel)
                for cl in claims:
                    row = held.get(cl.job_id)
                    if row is None or row[0] != cl.token or row[1] != "running":
                        reply.lost.add(cl.job_id)
                    elif row[2]:
                        reply.cancel_requested.add(cl.job_id)
            c.execute(
                Q["upsert_worker"],
                (
                    worker.id,
                    worker.host,
                    worker.pid,
                    _encoder.encode(worker.queues),
                    worker.concurrency,
                    worker.started_at,
                    now,
                    _encoder.encode(worker.running),
                    worker.processed,
                    worker.failed,
                ),
            )
        return reply

    async def finish(self, finishes: Sequence[Finish]) -> list[bool]:
        return await self._run(self._finish, finishes)

    def _finish(self, finishes: Sequence[Finish]) -> list[bool]:
        applied: list[bool] = []
        with self._write() as c:
            notify = self._apply_finishes(c, finishes, time.time(), applied)
        self._own_writes += 1  # a retry scheduled here must shorten our own wait()
        if notify:
            self._notify()
        return applied

    @staticmethod
    def _apply_finishes(
        c: sqlite3.Connection, finishes: Sequence[Finish], now: float, applied: list[bool]
    ) -> bool:
        """Write outcomes inside the caller's transaction; True if a job became due now."""
        notify = False
        for f in flatten_outcomes(finishes, now):
            job_id, token = f.job_id, f.token
            if f.kind == SUCCEEDED:
                cur = c.execute(Q["finish_succeeded"], (f.result, now, job_id, token))
            elif f.kind == RETRY:
                args = (f.run_at, now, f.run_at, f.error, job_id, token)
                cur = c.execute(Q["finish_retry"], args)
                notify = notify or f.delay_s == 0
            elif f.kind == FAILED:
                cur = c.execute(Q["finish_failed"], (f.error, now, job_id, token))
            elif f.kind == CANCELLED:
                cur = c.execute(Q["finish_cancelled"], (now, job_id, token))
            else:
                cur = c.execute(Q["finish_released"], (job_id, token))
                notify = True
            applied.append(cur.rowcount == 1)
        return notify

    async def record_progress(self, items: Sequence[Progress]) -> None:
        rows = [(p.fraction, p.message, p.claim.job_id, p.claim.token) for p in items]
        await self._run(self._executemany_write, Q["progress"], rows)

    def _executemany_write(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        with self._write() as c:
            c.executemany(sql, rows)

    async def recover(self, max_lost_leases: int) -> list[tuple[str, JobState]]:
        return await self._run(self._recover, max_lost_leases)

    def _recover(self, max_lost_leases: int) -> list[tuple[str, JobState]]:
        now = time.time()
        with self._write() as c:
            params = {
                "max_lost_leases": max_lost_leases,
                "now": now,
                "error_type": RECOVERED_ERROR_TYPE,
                "message": RECOVERED_MESSAGE,
            }
            rows = c.execute(Q["recover"], params).fetchall()
        recovered = [(job_id, JobState(state)) for job_id, state in rows]
        if any(state is JobState.QUEUED for _, state in recovered):
            self._notify()
        return recovered

    async def wait(
        self, queues: Sequence[str], timeout: float, handover: HandOver | None = None
    ) -> list[Job]:
        if self._listener is None:
            self._listener = WakeListener(self._wake_dir)
        next_due = await self._run(self._next_scheduled)
        now = time.time()
        if next_due is not None:
            timeout = min(timeout, max(0.0, next_due - now))
        deadline = now + timeout
        while True:
            remaining = deadline - time.time()
            if remaining <= 0:
                return []
            if await self._listener.wait(min(remaining, self.poll_s)):
                return []
            if await self._run(self._data_changed):
                return []

    def _next_scheduled(self) -> float | None:
        with self._errors():
            (value,) = self._read().execute(Q["next_scheduled"]).fetchone()
        return value  # type: ignore[no-any-return]

    def _data_changed(self) -> bool:
        with self._errors():
            (version,) = self._read().execute("PRAGMA data_version").fetchone()
        version = (version, self._own_writes)
        changed = version != getattr(self._local, "data_version", None)
        self._local.data_version = version
        return changed

    async def unregister_worker(self, worker_id: str) -> None:
        await self._run(self._executemany_write, Q["delete_worker"], [(worker_id,)])

    async def prune(self, finished_before: float, limit: int = 1000) -> int:
        return await self._run(self._prune, finished_before, limit)

    def _prune(self, finished_before: float, limit: int) -> int:
        with self._write() as c:
            deleted = c.execute(Q["prune"], (finished_before, limit)).rowcount
            c.execute(Q["prune_workers"], (time.time() - 3600,))
            c.execute(Q["prune_workflows"], (finished_before,))
            c.execute(Q["prune_events"], (time.time() - EVENTS_KEPT_S,))
        return deleted

    # --- inspection and management ----------------------------------------------------------

    async def now(self) -> float:
        return time.time()

    async def get(self, job_id: str) -> Job | None:
        return await self._run(self._get, job_id)

    def _get(self, job_id: str) -> Job | None:
        with self._errors():
            row = self._read().execute(Q["get"].format(columns=COLUMNS), (job_id,)).fetchone()
        return None if row is None else job_from_row(row)

    async def get_many(self, job_ids: Sequence[str]) -> list[Job | None]:
        if not job_ids:
            return []
        return await self._run(self._get_many, job_ids)

    def _get_many(self, job_ids: Sequence[str]) -> list[Job | None]:
        unique = list(dict.fromkeys(job_ids))
        found: dict[str, Job] = {}
        with self._errors():
            c = self._read()
            c.execute("BEGIN")  # one snapshot for every chunk
            try:
                for start in range(0, len(unique), GET_MANY_CHUNK):
                    ids = unique[start : start + GET_MANY_CHUNK]
                    sql = Q["get_many"].format(columns=COLUMNS, ids=",".join("?" * len(ids)))
                    for row in c.execute(sql, ids):
                        found[row[0]] = job_from_row(row)
            finally:
                c.execute("COMMIT")
        return [found.get(job_id) for job_id in job_ids]

    async def find_jobs(
        self, query: JobQuery, *, limit: int = 100, cursor: str | None = None, count: bool = False
    ) -> JobPage:
        return await self._run(self._find_jobs, query, limit, cursor, count)

    def _find_jobs(self, query: JobQuery, limit: int, cursor: str | None, count: bool) -> JobPage:
        where, params = _filters(query)
        page_where, page_params = list(where), list(params)
        if query.order == "finished":
            order = "finished_at DESC, seq DESC"
            if cursor is not None:
                page_where.append("(finished_at, seq) < (?, ?)")
                page_params += decode_cursor(cursor, "finished", (float, int))
        else:
            order = "seq DESC"
            if cursor is not None:
                page_where.append("seq < ?")
                page_params += decode_cursor(cursor, "enqueued", (int,))
        sql = (
            f"SELECT seq, {COLUMNS} FROM taskmill_jobs WHERE {_all(page_where)} "
            f"ORDER BY {order} LIMIT ?"
        )
        with self._errors():
            c = self._read()
            c.execute("BEGIN")  # one snapshot for the page and its count
            try:
                rows = c.execute(sql, [*page_params, limit + 1]).fetchall()
                total = None
                if count:
                    counted = f"SELECT count(*) FROM taskmill_jobs WHERE {_all(where)}"
                    total = int(c.execute(counted, params).fetchone()[0])
            finally:
                c.execute("COMMIT")
        jobs = [job_from_row(r[1:]) for r in rows[:limit]]
        next_cursor = None
        if len(rows) > limit:
            last = rows[limit - 1]
            position = (last[12], last[0]) if query.order == "finished" else (last[0],)
            next_cursor = encode_cursor(query.order, *position)
        return JobPage(jobs, next_cursor, total)

    async def stats(self) -> list[QueueStats]:
        return await self._run(self._stats)

    def _stats(self) -> list[QueueStats]:
        now = time.time()
        with self._errors():
            c = self._read()
            c.execute("BEGIN")  # one snapshot for the three reads
            try:
                counts = c.execute(Q["stats"]).fetchall()
                oldest = dict(c.execute(Q["oldest_waiting"]).fetchall())
                paused = dict(c.execute(Q["all_queues"]).fetchall())
            finally:
                c.execute("COMMIT")
        by_queue: dict[str, QueueStats] = {}
        for queue in {q for q, _, _ in counts} | set(paused):
            by_queue[queue] = QueueStats(
                queue=queue,
                counts={s.value: 0 for s in JobState},
                oldest_waiting_s=None
                if oldest.get(queue) is None
                else max(0.0, now - oldest[queue]),
                paused=bool(paused.get(queue, 0)),
            )
        for queue, state, n in counts:
            by_queue[queue].counts[state] = n
        return [by_queue[q] for q in sorted(by_queue)]

    async def list_workers(self) -> list[WorkerInfo]:
        return await self._run(self._list_workers)

    def _list_workers(self) -> list[WorkerInfo]:
        with self._errors():
            rows = self._read().execute(Q["workers"]).fetchall()
        return [
            WorkerInfo(
                id=r[0],
                host=r[1],
                pid=r[2],
                queues=msgspec.json.decode(r[3]),
                concurrency=r[4],
                started_at=r[5],
                heartbeat_at=r[6],
                running=msgspec.json.decode(r[7]),
                processed=r[8],
                failed=r[9],
            )
            for r in rows
        ]

    async def retry(self, job_ids: Sequence[str] | None) -> list[str]:
        return await self._run(self._retry, job_ids)

    def _retry(self, job_ids: Sequence[str] | None) -> list[str]:
        now = time.time()
        with self._write() as c:
            if job_ids is None:
                ids = [r[0] for r in c.execute(Q["retry_all_failed"], (now,)).fetchall()]
            else:
                ids = []
                for job_id in job_ids:
                    ids += [r[0] for r in c.execute(Q["retry"], (now, job_id)).fetchall()]
        if ids:
            self._notify()
        return ids

    async def cancel(self, job_id: str) -> JobState | None:
        return await self._run(self._cancel, job_id)

    def _cancel(self, job_id: str) -> JobState | None:
        with self._write() as c:
            c.execute(Q["cancel_waiting"], (time.time(), job_id))
            c.execute(Q["cancel_running"], (job_id,))
            row = c.execute(Q["state_of"], (job_id,)).fetchone()
        return None if row is None else JobState(row[0])

    async def run_now(self, job_id: str) -> JobState | None:
        return await self._run(self._run_now, job_id)

    def _run_now(self, job_id: str) -> JobState | None:
        with self._write() as c:
            row = c.execute(Q["state_of"], (job_id,)).fetchone()
            if row is not None and row[0] == "scheduled":
                c.execute(Q["run_now"], (time.time(), job_id))
        if row is None:
            return None
        if row[0] == "scheduled":
            self._own_writes += 1
            self._notify()
        return JobState(row[0])

    async def purge(self, queue: str) -> int:
        return await self._run(self._purge, queue)

    def _purge(self, queue: str) -> int:
        with self._write() as c:
            return c.execute(Q["purge"], (queue,)).rowcount

    async def pause(self, queue: str, paused: bool) -> None:
        await self._run(self._executemany_write, Q["pause"], [(queue, int(paused))])
        if not paused:
            self._notify()

    async def schedule_marks(self) -> dict[str, float]:
        return await self._run(self._schedule_marks)

    def _schedule_marks(self) -> dict[str, float]:
        with self._errors():
            return dict(self._read().execute(Q["schedule_marks"]).fetchall())

    async def mark_schedules(self, marks: Mapping[str, float]) -> None:
        if marks:
            await self._run(self._executemany_write, Q["mark_schedule"], list(marks.items()))

    async def save_workflow(self, workflow_id: str, spec: bytes) -> None:
        await self._run(
            self._executemany_write, Q["save_workflow"], [(workflow_id, spec, time.time())]
        )

    async def get_workflow(self, workflow_id: str) -> WorkflowRecord | None:
        return await self._run(self._get_workflow, workflow_id)

    def _get_workflow(self, workflow_id: str) -> WorkflowRecord | None:
        with self._errors():
            row = self._read().execute(Q["get_workflow"], (workflow_id,)).fetchone()
        return None if row is None else WorkflowRecord(*row)

    async def end_workflow(self, workflow_id: str, state: str) -> bool:
        return await self._run(self._end_workflow, workflow_id, state)

    def _end_workflow(self, workflow_id: str, state: str) -> bool:
        with self._write() as c:
            changed = c.execute(Q["end_workflow"], (state, time.time(), workflow_id)).rowcount
        return changed == 1

    async def running_workflows(self, limit: int = 1000) -> list[str]:
        return await self._run(self._running_workflows, limit)

    def _running_workflows(self, limit: int) -> list[str]:
        with self._errors():
            return [r[0] for r in self._read().execute(Q["running_workflows"], (limit,))]

    async def reserve_rate_slot(self, bucket: str, interval_s: float) -> float:
        return await self._run(self._reserve_rate_slot, bucket, interval_s)

    def _reserve_rate_slot(self, bucket: str, interval_s: float) -> float:
        with self._write() as c:  # a write transaction: one reservation at a time
            now = time.time()
            row = c.execute(Q["rate_tat"], (bucket,)).fetchone()
            start = max(row[0], now) if row is not None else now
            c.execute(Q["set_rate_tat"], (bucket, start + interval_s))
        return start - now

    async def acquire_slot(self, bucket: str, holder: str, limit: int, ttl_s: float) -> bool:
        return await self._run(self._acquire_slot, bucket, holder, limit, ttl_s)

    def _acquire_slot(self, bucket: str, holder: str, limit: int, ttl_s: float) -> bool:
        with self._write() as c:  # a write transaction: one acquirer at a time
            now = time.time()
            c.execute(Q["drop_expired_slots"], (bucket, now))
            holders = {r[0] for r in c.execute(Q["slot_holders"], (bucket,))}
            if holder not in holders and len(holders) >= limit:
                return False
            c.execute(Q["hold_slot"], (bucket, holder, now + ttl_s))
            return True

    async def release_slot(self, bucket: str, holder: str) -> None:
        await self._run(self._executemany_write, Q["release_slot"], [(bucket, holder)])

    async def queue_depth(self, queue: str) -> int:
        return await self._run(self._queue_depth, queue)

    def _queue_depth(self, queue: str) -> int:
        with self._errors():
            return int(self._read().execute(Q["queue_depth"], (queue,)).fetchone()[0])

    async def publish_events(self, payload: bytes) -> None:
        await self._run(self._executemany_write, Q["publish_events"], [(payload, time.time())])

    def events_subscription(self) -> Subscription:
        return _SQLiteSubscription(self)

    def _last_event(self) -> int:
        with self._errors():
            return int(self._read().execute(Q["last_event"]).fetchone()[0])

    def _events_after(self, seq: int) -> list[tuple[int, bytes]]:
        with self._errors():
            return self._read().execute(Q["events_after"], (seq,)).fetchall()


class _SQLiteSubscription(Subscription):
    """Polls the events table every 50 ms for rows after the last one seen."""

    POLL_S = 0.05

    def __init__(self, broker: SQLiteBroker) -> None:
        self._broker = broker
        self._seq = 0
        self._ready: list[bytes] = []

    async def start(self) -> None:
        self._seq = await self._broker._run(self._broker._last_event)

    async def get(self) -> bytes:
        while not self._ready:
            rows = await self._broker._run(self._broker._events_after, self._seq)
            if rows:
                self._seq = rows[-1][0]
                self._ready = [bytes(payload) for _, payload in rows]
            else:
                await asyncio.sleep(self.POLL_S)
        return self._ready.pop(0)

    async def close(self) -> None:
        self._ready = []
