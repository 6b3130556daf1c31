"""``SQLiteBroker``: every operation of the contract as SQL on one file.

Each operation is written once, as blocking code on the calling thread's connection: a
producer's ``send()`` runs it on its own thread, and async callers await it on the database's
thread (``on_database_thread``). Each is one short write transaction, or one read.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from taskmill.brokers._rows import (
    CANCELLED,
    FAILED,
    JOB_COLUMNS,
    RECOVERED_ERROR_TYPE,
    RECOVERED_MESSAGE,
    RETRY,
    SUCCEEDED,
    encode_error,
    flatten_outcomes,
    job_from_row,
    unreadable_record,
)
from taskmill.brokers.base import (
    Broker,
    Capabilities,
    EnqueueResult,
    HandOver,
    HeartbeatReply,
    JobPage,
    JobQuery,
    OnConflict,
    decode_cursor,
    encode_cursor,
)
from taskmill.brokers.features import (
    EventBus,
    LimitStore,
    ScheduleStore,
    Subscription,
    WorkflowRecord,
    WorkflowStore,
)
from taskmill.brokers.sqlite.connection import Database, on_database_thread, options_from_url
from taskmill.brokers.sqlite.schema import COLUMNS, COUNTED_STATES, PAYLOAD_APART_BYTES, Q
from taskmill.brokers.sqlite.wakeup import Wakeups
from taskmill.errors import BrokerError, DuplicateJobError
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

log = logging.getLogger("taskmill.broker")


_UNDECODABLE = "Could not decode to UTF-8"
"""What ``sqlite3`` says when a text column holds bytes that are not UTF-8."""


def _fetch_lenient(c: sqlite3.Connection, sql: str, params: Sequence[Any]) -> list[Any]:
    """``sql``'s rows; text that is not UTF-8 read with U+FFFD for the bad bytes, not raised
    (a listing must show the other records)."""
    try:
        return c.execute(sql, params).fetchall()
    except sqlite3.OperationalError as exc:
        if _UNDECODABLE not in str(exc):
            raise
    c.text_factory = lambda raw: raw.decode("utf-8", "replace")
    try:
        return c.execute(sql, params).fetchall()
    finally:
        c.text_factory = str


def _listable(rows: Sequence[Any]) -> list[Job]:
    """The jobs of ``rows`` that read as jobs; the others are left out (logged)."""
    jobs = []
    for r in rows:
        try:
            jobs.append(job_from_row(r[1:]))
        except Exception as exc:
            log.warning("listing leaves out stored record seq %s, id %.80r: %r", r[0], r[1], exc)
    return jobs


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


EVENTS_KEPT_S = 3600.0
"""Events are a polled table here: kept an hour, so a subscriber that polls late misses none."""
COUNT_SCAN_MAX = 100_000
"""A listing's total with a task or meta filter reads at most this many jobs (the newest of
its states and queue); past that it is an estimate (``JobPage.total_estimated``)."""
GET_MANY_CHUNK = 500
"""Ids per statement of ``get_many`` (SQLite before 3.32 takes at most 999 parameters)."""
_encoder = msgspec.json.Encoder()


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


def _count(c: sqlite3.Connection, query: JobQuery) -> tuple[int, bool]:
    """How many jobs match ``query``, and whether that is an estimate. Without a task or
    meta filter, from the counts of the states (``schema_v6``): no job is read, exact. With
    one, the newest ``COUNT_SCAN_MAX`` jobs of the query's states and queue are read: all
    of them, an exact count; else the share that matches among them, times all of them."""
    if query.task is None and not query.meta:
        return _count_selected(c, query), False
    selected = dataclasses.replace(query, task=None, meta={})
    where, params = _filters(query)
    base, base_params = _filters(selected)
    extra = " AND ".join(where[len(base) :])  # _filters puts the task and meta terms last
    sql = (
        f"SELECT count(*), coalesce(sum({extra}), 0) FROM (SELECT task, meta FROM "
        f"taskmill_jobs WHERE {_all(base)} ORDER BY seq DESC LIMIT ?)"
    )
    row = c.execute(sql, [*params[len(base_params) :], *base_params, COUNT_SCAN_MAX]).fetchone()
    read, matched = int(row[0]), int(row[1])
    if read < COUNT_SCAN_MAX:
        return matched, False
    return round(matched / read * _count_selected(c, selected)), True


def _count_selected(c: sqlite3.Connection, query: JobQuery) -> int:
    """How many jobs are in the query's states and queue (its other filters aside)."""
    states = {s.value for s in query.states} or {s.value for s in JobState}
    of_queue = [] if query.queue is None else [query.queue]
    queue_sql = "" if query.queue is None else Q["queue_filter"]
    total = 0
    counted = sorted(states & set(COUNTED_STATES))
    if counted:
        sql = Q["count_counted"].format(states=",".join("?" * len(counted)), queue=queue_sql)
        total += int(c.execute(sql, [*counted, *of_queue]).fetchone()[0])
    for indexed in sorted(states - set(COUNTED_STATES)):  # queued, running: their indexes
        sql = Q[f"count_{indexed}"].format(queue=queue_sql)
        total += int(c.execute(sql, of_queue).fetchone()[0])
    return total


class SQLiteBroker(Broker, ScheduleStore, WorkflowStore, LimitStore, EventBus):
    name = "sqlite"
    capabilities = Capabilities(
        shared_across_processes=True,
        server_clock=False,
        transactional_enqueue=True,
        push_wakeups=True,
    )

    def __init__(self, url: str) -> None:
        self.url = url
        options = options_from_url(url)
        self.path = options.path
        self.busy_timeout_ms = options.busy_timeout_ms
        self.synchronous = options.synchronous
        self.poll_s = options.poll_s
        self._db = Database(options)
        self._wake = Wakeups(self.path)
        self._opened = False
        self._start_lock = threading.Lock()
        self._claim_sql: dict[int, str] = {}

    # --- life cycle -------------------------------------------------------------------------

    async def open(self) -> None:
        self.open_blocking()

    def open_blocking(self) -> None:
        with self._start_lock:
            if self._opened:
                return
            self._db.start()
            self._wake.open()
            self._opened = True

    async def close(self) -> None:
        await self._db.close()
        self._wake.close()
        self._opened = False

    # --- producers ------------------------------------------------------------------------

    @on_database_thread
    def enqueue(
        self, jobs: Sequence[NewJob], *, on_conflict: OnConflict = "return"
    ) -> EnqueueResult:
        return self._enqueue(jobs, on_conflict, None)

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
        apart: list[tuple[bytes, str]] = []
        due = False
        for i, j in enumerate(jobs):
            run_at = j.run_at if j.run_at is not None else now + j.delay_s
            queued = run_at <= now
            due = due or queued
            payload = j.payload
            if len(payload) > PAYLOAD_APART_BYTES:
                apart.append((payload, j.id))
                payload = b""
            row = (
                j.id,
                j.task,
                j.queue,
                "queued" if queued else "scheduled",
                payload,
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
            with self._db.errors():
                self._insert(conn, plain, keyed, apart, result, on_conflict)
        else:
            with self._db.write() as conn:
                self._insert(conn, plain, keyed, apart, result, on_conflict)
        self._wake.wrote()
        if due:
            self._wake.notify()
        return result

    def _check_same_file(self, conn: sqlite3.Connection) -> None:
        with self._db.errors():
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
        apart: list[tuple[bytes, str]],
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
        if apart:  # the payloads of the rows just stored with an empty one
            conn.executemany(Q["insert_payload"], apart)

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

    @on_database_thread
    def claim(self, queues: Sequence[str], limit: int, worker_id: str, lease_s: float) -> list[Job]:
        return self._claim(queues, limit, worker_id, lease_s, (), [])

    @on_database_thread
    def finish_and_claim(
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
        finishes: Sequence[Finish],
        applied: list[bool],
    ) -> list[Job]:
        try:
            return self._claim_once(queues, limit, worker_id, lease_s, finishes, applied)
        except BrokerError as exc:
            if _UNDECODABLE not in str(exc):
                raise
            # a text column of a candidate is not UTF-8: the claim rolled back. Set the
            # unreadable records aside (another worker may have done so first), then claim
            # again, once (else every claim would fail on them)
            del applied[:]
            self._set_aside_undecodable(queues, limit)
        return self._claim_once(queues, limit, worker_id, lease_s, finishes, applied)

    def _claim_once(
        self,
        queues: Sequence[str],
        limit: int,
        worker_id: str,
        lease_s: float,
        finishes: Sequence[Finish],
        applied: list[bool],
    ) -> list[Job]:
        # listen before the first claim, so a notify after an empty claim is not missed; and
        # the baseline for wait(): any commit after this wakes it
        self._wake.listener()
        self._data_changed()
        now = time.time()
        token = os.urandom(8).hex()
        notify = False
        with self._db.write() as c:
            if finishes:
                notify = self._apply_finishes(c, finishes, now, applied)
            c.execute(Q["promote_due"], (now,))
            paused = {r[0] for r in c.execute(Q["paused_queues"])}
            active = [q for q in queues if q not in paused] if paused else list(queues)
            if not active:
                rows = []
            else:
                rows = self._claim_rows(c, active, limit, token, now + lease_s, worker_id, now)
        if notify:
            self._wake.notify()
        rows.sort(key=lambda r: (-r[6], r[9], r[0]))  # priority desc, run_at, enqueue order
        try:
            return [job_from_row(r[1:]) for r in rows]
        except Exception:  # one record is unreadable: the others are claimed all the same
            return self._readable(rows, token)

    def _readable(self, rows: list[Any], token: str) -> list[Job]:
        """The jobs of claimed ``rows`` that read as jobs; each other one is failed at once
        (``SerializationError`` naming the record and what is wrong), logged, not run."""
        jobs: list[Job] = []
        bad: list[tuple[bytes, int]] = []
        for r in rows:
            try:
                jobs.append(job_from_row(r[1:]))
            except Exception as exc:
                error = unreadable_record(f"seq {r[0]}, id {r[1]!r:.80}", exc)
                log.error("%s", error.message)
                bad.append((encode_error(error), r[0]))
        now = time.time()
        with self._db.write() as c:
            c.executemany(
                "UPDATE taskmill_jobs SET state = 'failed', error = ?, finished_at = ?,"
                " lease_token = NULL, lease_expires_at = NULL, payload = CAST(payload AS BLOB)"
                " WHERE seq = ? AND lease_token = ? AND state = 'running'",
                [(error, now, seq, token) for error, seq in bad],
            )
        return jobs

    def _set_aside_undecodable(self, queues: Sequence[str], limit: int) -> bool:
        """Fail the queued records first in line whose text columns are not UTF-8 (``sqlite3``
        cannot read them: any statement returning one raises). Each such column is rewritten
        readable (the id as ``unreadable-SEQ``, a payload as its bytes, other text with
        U+FFFD for the bad bytes); the error keeps the original bytes, in hex. True if any."""
        now = time.time()
        marks = ",".join("?" * len(queues))
        probe = ", ".join(f"typeof({col}), CAST({col} AS BLOB)" for col in JOB_COLUMNS)
        found = False
        with self._db.write() as c:
            c.text_factory = bytes
            try:
                rows = c.execute(
                    f"SELECT seq, {probe} FROM taskmill_jobs WHERE state = 'queued' AND queue"
                    f" IN ({marks}) ORDER BY priority DESC, run_at, seq LIMIT ?",
                    [*queues, limit],
                ).fetchall()
            finally:
                c.text_factory = str
            for row in rows:
                seq, values = row[0], row[1:]
                unreadable: dict[str, bytes] = {}
                for i, col in enumerate(JOB_COLUMNS):
                    kind, raw = values[2 * i], values[2 * i + 1]
                    if kind == b"text" and not _utf8(raw):
                        unreadable[col] = raw
                if not unreadable:
                    continue
                found = True
                what = ", ".join(f"{col} {raw[:64].hex()}" for col, raw in unreadable.items())
                error = unreadable_record(
                    f"seq {seq}", ValueError(f"text not valid UTF-8 (hex): {what}")
                )
                log.error("%s", error.message)
                sets: list[str] = []
                params: list[Any] = []
                for col, raw in unreadable.items():
                    sets.append(f"{col} = ?")  # col: one of JOB_COLUMNS
                    if col == "id":
                        params.append(f"unreadable-{seq}")
                    elif col in ("payload", "result"):
                        params.append(raw)
                    else:
                        params.append(raw.decode("utf-8", "replace"))
                c.execute(
                    f"UPDATE taskmill_jobs SET {', '.join(sets)}, state = 'failed', error = ?,"
                    " finished_at = ?, lease_token = NULL, lease_expires_at = NULL"
                    " WHERE seq = ?",
                    (*params, encode_error(error), now, seq),
                )
        return found

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

    @on_database_thread
    def heartbeat(
        self, worker: WorkerInfo, claims: Sequence[Claim], lease_s: float
    ) -> HeartbeatReply:
        now = time.time()
        reply = HeartbeatReply()
        with self._db.write() as c:
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

    @on_database_thread
    def finish(self, finishes: Sequence[Finish]) -> list[bool]:
        applied: list[bool] = []
        with self._db.write() as c:
            notify = self._apply_finishes(c, finishes, time.time(), applied)
        self._wake.wrote()  # a retry scheduled here must shorten our own wait()
        if notify:
            self._wake.notify()
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

    @on_database_thread
    def record_progress(self, items: Sequence[Progress]) -> None:
        rows = [(p.fraction, p.message, p.claim.job_id, p.claim.token) for p in items]
        self._db.write_many(Q["progress"], rows)

    @on_database_thread
    def recover(self, max_lost_leases: int) -> list[tuple[str, JobState]]:
        now = time.time()
        with self._db.write() as c:
            params = {
                "max_lost_leases": max_lost_leases,
                "now": now,
                "error_type": RECOVERED_ERROR_TYPE,
                "message": RECOVERED_MESSAGE,
            }
            rows = c.execute(Q["recover"], params).fetchall()
        recovered = [(job_id, JobState(state)) for job_id, state in rows]
        if any(state is JobState.QUEUED for _, state in recovered):
            self._wake.notify()
        return recovered

    async def wait(
        self, queues: Sequence[str], timeout: float, handover: HandOver | None = None
    ) -> list[Job]:
        listener = self._wake.listener()
        next_due = await self._db.run(self._next_scheduled)
        now = time.time()
        if next_due is not None:
            timeout = min(timeout, max(0.0, next_due - now))
        deadline = now + timeout
        while True:
            remaining = deadline - time.time()
            if remaining <= 0:
                return []
            if await listener.wait(min(remaining, self.poll_s)):
                return []
            if await self._db.run(self._data_changed):
                return []

    def _next_scheduled(self) -> float | None:
        ((value,),) = self._db.query(Q["next_scheduled"])
        return value  # type: ignore[no-any-return]

    def _data_changed(self) -> bool:
        with self._db.errors():
            return self._wake.data_changed(self._db.read())

    @on_database_thread
    def unregister_worker(self, worker_id: str) -> None:
        self._db.write_many(Q["delete_worker"], [(worker_id,)])

    @on_database_thread
    def prune(self, finished_before: float, limit: int = 1000) -> int:
        with self._db.write() as c:
            deleted: int = c.execute(Q["prune"], (finished_before, limit)).rowcount
            c.execute(Q["prune_workers"], (time.time() - 3600,))
            c.execute(Q["prune_workflows"], (finished_before,))
            c.execute(Q["prune_events"], (time.time() - EVENTS_KEPT_S,))
        return deleted

    # --- inspection and management ----------------------------------------------------------

    async def now(self) -> float:
        return time.time()

    @on_database_thread
    def get(self, job_id: str) -> Job | None:
        rows = self._db.query(Q["get"].format(columns=COLUMNS), (job_id,))
        return job_from_row(rows[0]) if rows else None

    @on_database_thread
    def get_by_key(self, key: str) -> Job | None:
        rows = self._db.query(Q["get_by_key"].format(columns=COLUMNS), (key,))
        return job_from_row(rows[0]) if rows else None

    @on_database_thread
    def get_many(self, job_ids: Sequence[str]) -> list[Job | None]:
        if not job_ids:
            return []
        unique = list(dict.fromkeys(job_ids))
        found: dict[str, Job] = {}
        with self._db.snapshot() as c:  # one state of the file for every chunk
            for start in range(0, len(unique), GET_MANY_CHUNK):
                ids = unique[start : start + GET_MANY_CHUNK]
                sql = Q["get_many"].format(columns=COLUMNS, ids=",".join("?" * len(ids)))
                for row in c.execute(sql, ids):
                    found[row[0]] = job_from_row(row)
        return [found.get(job_id) for job_id in job_ids]

    @on_database_thread
    def find_jobs(
        self, query: JobQuery, *, limit: int = 100, cursor: str | None = None, count: bool = False
    ) -> JobPage:
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
        with self._db.snapshot() as c:  # one state of the file for the page and its count
            rows = _fetch_lenient(c, sql, [*page_params, limit + 1])
            total, estimated = None, False
            if count:
                total, estimated = _count(c, query)
        try:
            jobs = [job_from_row(r[1:]) for r in rows[:limit]]
        except Exception:  # a record no worker claimed yet that does not read as a job
            jobs = _listable(rows[:limit])
        next_cursor = None
        if len(rows) > limit:
            last = rows[limit - 1]
            position = (last[12], last[0]) if query.order == "finished" else (last[0],)
            next_cursor = encode_cursor(query.order, *position)
        return JobPage(jobs, next_cursor, total, total_estimated=estimated)

    @on_database_thread
    def finished_per_minute(
        self, since: float, queue: str | None = None
    ) -> list[tuple[int, JobState, int]]:
        params: list[Any] = [since]
        if queue is not None:
            params.append(queue)
        sql = Q["finished_per_minute"].format(queue="" if queue is None else Q["queue_filter"])
        return [(m, JobState(state), n) for m, state, n in self._db.query(sql, params)]

    @on_database_thread
    def delete(self, job_ids: Sequence[str]) -> list[str]:
        deleted: list[str] = []
        with self._db.write() as c:
            for job_id in job_ids:
                if c.execute(Q["delete_finished"], (job_id,)).rowcount == 1:
                    deleted.append(job_id)
        return deleted

    @on_database_thread
    def stats(self) -> list[QueueStats]:
        now = time.time()
        with self._db.snapshot() as c:  # one state of the file for the three reads
            counts = c.execute(Q["stats"]).fetchall()
            queued = c.execute(Q["oldest_waiting"]).fetchall()
            paused = dict(c.execute(Q["all_queues"]).fetchall())
        oldest = {queue: at for queue, at, _ in queued}
        counts += [(queue, "queued", n) for queue, _, n in queued]
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

    @on_database_thread
    def list_workers(self) -> list[WorkerInfo]:
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
            for r in self._db.query(Q["workers"])
        ]

    @on_database_thread
    def retry(self, job_ids: Sequence[str] | None) -> list[str]:
        now = time.time()
        with self._db.write() as c:
            if job_ids is None:
                ids = [r[0] for r in c.execute(Q["retry_all_failed"], (now,)).fetchall()]
            else:
                ids = []
                for job_id in job_ids:
                    ids += [r[0] for r in c.execute(Q["retry"], (now, job_id)).fetchall()]
        if ids:
            self._wake.notify()
        return ids

    @on_database_thread
    def cancel(self, job_id: str) -> JobState | None:
        with self._db.write() as c:
            c.execute(Q["cancel_waiting"], (time.time(), job_id))
            c.execute(Q["cancel_running"], (job_id,))
            row = c.execute(Q["state_of"], (job_id,)).fetchone()
        return None if row is None else JobState(row[0])

    @on_database_thread
    def run_now(self, job_id: str) -> JobState | None:
        with self._db.write() as c:
            row = c.execute(Q["state_of"], (job_id,)).fetchone()
            if row is not None and row[0] == "scheduled":
                c.execute(Q["run_now"], (time.time(), job_id))
        if row is None:
            return None
        if row[0] == "scheduled":
            self._wake.wrote()
            self._wake.notify()
        return JobState(row[0])

    @on_database_thread
    def purge(self, queue: str) -> int:
        with self._db.write() as c:
            purged: int = c.execute(Q["purge"], (queue,)).rowcount
        return purged

    @on_database_thread
    def pause(self, queue: str, paused: bool) -> None:
        self._db.write_many(Q["pause"], [(queue, int(paused))])
        if not paused:
            self._wake.notify()

    # --- periodic schedules -------------------------------------------------------------------

    @on_database_thread
    def schedule_marks(self) -> dict[str, float]:
        return dict(self._db.query(Q["schedule_marks"]))

    @on_database_thread
    def mark_schedules(self, marks: Mapping[str, float]) -> None:
        if marks:
            self._db.write_many(Q["mark_schedule"], list(marks.items()))

    # --- workflows ----------------------------------------------------------------------------

    @on_database_thread
    def save_workflow(self, workflow_id: str, spec: bytes) -> None:
        self._db.write_many(Q["save_workflow"], [(workflow_id, spec, time.time())])

    @on_database_thread
    def get_workflow(self, workflow_id: str) -> WorkflowRecord | None:
        rows = self._db.query(Q["get_workflow"], (workflow_id,))
        return WorkflowRecord(*rows[0]) if rows else None

    @on_database_thread
    def end_workflow(self, workflow_id: str, state: str) -> bool:
        with self._db.write() as c:
            changed: int = c.execute(Q["end_workflow"], (state, time.time(), workflow_id)).rowcount
        return changed == 1

    @on_database_thread
    def reopen_workflow(self, workflow_id: str) -> bool:
        with self._db.write() as c:
            changed: int = c.execute(Q["reopen_workflow"], (workflow_id,)).rowcount
        return changed == 1

    @on_database_thread
    def running_workflows(self, limit: int = 1000) -> list[str]:
        return [r[0] for r in self._db.query(Q["running_workflows"], (limit,))]

    # --- flow control -------------------------------------------------------------------------

    @on_database_thread
    def reserve_rate_slot(self, bucket: str, interval_s: float) -> float:
        with self._db.write() as c:  # a write transaction: one reservation at a time
            now = time.time()
            row = c.execute(Q["rate_tat"], (bucket,)).fetchone()
            start: float = max(row[0], now) if row is not None else now
            c.execute(Q["set_rate_tat"], (bucket, start + interval_s))
        return start - now

    @on_database_thread
    def acquire_slot(self, bucket: str, holder: str, limit: int, ttl_s: float) -> bool:
        with self._db.write() as c:  # a write transaction: one acquirer at a time
            now = time.time()
            c.execute(Q["drop_expired_slots"], (bucket, now))
            holders = {r[0] for r in c.execute(Q["slot_holders"], (bucket,))}
            if holder not in holders and len(holders) >= limit:
                return False
            c.execute(Q["hold_slot"], (bucket, holder, now + ttl_s))
            return True

    @on_database_thread
    def release_slot(self, bucket: str, holder: str) -> None:
        self._db.write_many(Q["release_slot"], [(bucket, holder)])

    @on_database_thread
    def queue_depth(self, queue: str) -> int:
        return int(self._db.query(Q["queue_depth"], (queue,))[0][0])

    # --- live events ----------------------------------------------------------------------------

    @on_database_thread
    def publish_events(self, payload: bytes) -> None:
        self._db.write_many(Q["publish_events"], [(payload, time.time())])

    def events_subscription(self) -> Subscription:
        return _SQLiteSubscription(self._db)


class _SQLiteSubscription(Subscription):
    """Polls the events table every 50 ms for rows after the last one seen."""

    POLL_S = 0.05

    def __init__(self, db: Database) -> None:
        self._db = db
        self._seq = 0
        self._ready: list[bytes] = []

    async def start(self) -> None:
        ((last,),) = await self._db.run(self._db.query, Q["last_event"])
        self._seq = int(last)

    async def get(self) -> bytes:
        while not self._ready:
            rows = await self._db.run(self._db.query, Q["events_after"], (self._seq,))
            if rows:
                self._seq = rows[-1][0]
                self._ready = [bytes(payload) for _, payload in rows]
            else:
                await asyncio.sleep(self.POLL_S)
        return self._ready.pop(0)

    async def close(self) -> None:
        self._ready = []
