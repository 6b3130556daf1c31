"""``PostgresBroker``: every operation of the contract as named queries of ``sql/postgres.sql``.

- A claim is one ``UPDATE … WHERE seq IN (SELECT … FOR UPDATE SKIP LOCKED)`` over a partial
  index of ready jobs. It travels in one transaction and one network round trip (psycopg's
  pipeline mode) with the previous batch's outcomes and the promotion of due scheduled jobs.
- Outcomes are fenced by the lease token inside the ``UPDATE``'s ``WHERE``.
- Idle workers ``LISTEN`` on a connection of their own (``listener.py``); enqueues
  ``pg_notify`` in the same statement, so the wake-up is sent when the job is committed (also
  inside a caller's transaction, for transactional enqueue).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import psycopg
from psycopg.pq import TransactionStatus
from psycopg.rows import TupleRow

from taskmill.brokers._io import on_io_loop
from taskmill.brokers._rows import (
    RECOVERED_ERROR_TYPE,
    RECOVERED_MESSAGE,
    flatten_outcomes,
    job_from_row,
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
from taskmill.brokers.postgres.config import parse_url, queries
from taskmill.brokers.postgres.connection import (
    AsyncConn,
    Connections,
    LoopState,
    SyncConn,
    pipelined_transaction,
    savepoint,
)
from taskmill.brokers.postgres.listener import PostgresSubscription
from taskmill.brokers.postgres.migrations import (
    Migration,
    apply_migrations,
    check_schema,
    schema_version,
)
from taskmill.brokers.postgres.vacuum import VacuumPacer, vacuum_jobs
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

_SLOT_LOCK = 0x74736C74  # advisory lock class of concurrency slots ('tslt')
_KEY_RACE_TRIES = 5
"""How often a send retries a job whose key's holder finished between the insert and the
look-up of the holder (each retry needs that race to happen again)."""
_encoder = msgspec.json.Encoder()
ESTIMATE_ABOVE_ROWS = 100_000
"""On a jobs table larger than this (by the planner's reckoning) the finished jobs are
estimated in ``stats`` and listing totals, not counted: a count reads every one of them,
longer than a dashboard may wait. Waiting and running jobs are always counted."""
_PENDING = frozenset({JobState.SCHEDULED, JobState.QUEUED, JobState.RUNNING})
_FINISHED_NAMES = ["cancelled", "failed", "succeeded"]


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
            "size": 1,
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
        "size": len(jobs),
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


def _consume(task: asyncio.Future[Any]) -> None:
    """Retrieve the outcome of a shielded call nobody awaits any more (no warning)."""
    if not task.cancelled():
        task.exception()


class PostgresBroker(Broker, ScheduleStore, WorkflowStore, LimitStore, EventBus):
    name = "postgres"
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
        self._db = Connections(url, self.config)
        self._ready = False
        self._ready_lock = threading.Lock()
        self._vacuum_pacer = VacuumPacer()

    def __repr__(self) -> str:
        return f"<PostgresBroker {self.config.where} schema={self.schema}>"

    # --- life cycle and the schema ------------------------------------------------------------

    def prepare_blocking(self) -> None:
        """Create or upgrade the schema (or, with ``migrate=false``, check it is there and
        current), once per broker. Retried while the server is unreachable."""
        if self._ready:
            return
        with self._ready_lock:
            if not self._ready:
                self._db.on_own_connection(self._prepare, retry=True)
                self._ready = True

    def _prepare(self, conn: SyncConn) -> None:
        if self.config.migrate:
            apply_migrations(conn, self.schema)
            return
        problem = check_schema(conn, self.schema, self.config.where)
        if problem is not None:
            raise BrokerError(problem)

    def migrate_blocking(self, target: int | None = None) -> list[Migration]:
        """Apply the migrations this schema lacks (up to ``target``); what was applied. What
        ``taskmill migrate`` runs; works whatever the URL's ``migrate`` option says."""
        applied = self._db.on_own_connection(
            lambda conn: apply_migrations(conn, self.schema, target), retry=False
        )
        if target is None:
            self._ready = True
        return applied

    def schema_version_blocking(self) -> int | None:
        """The schema's migration version; None if taskmill's tables are not there."""
        return self._db.on_own_connection(
            lambda conn: schema_version(conn, self.schema), retry=False
        )

    async def open(self) -> None:
        if not self._ready:
            await asyncio.to_thread(self.prepare_blocking)

    async def close(self) -> None:
        await self._db.close()

    async def attach(self) -> None:
        await self._db.attach()

    async def detach(self) -> None:
        await self._db.detach()

    # what ``on_io_loop`` reads: the loops that run their calls themselves, and the I/O loop
    @property
    def _attached(self) -> set[asyncio.AbstractEventLoop]:
        return self._db.attached

    def _io_loop(self) -> asyncio.AbstractEventLoop:
        return self._db.io_loop()

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

        return self._db.run_blocking(op)

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
            with savepoint(conn) if atomic else contextlib.nullcontext():
                return self._store(conn, jobs, on_conflict, check_stored=False)
        except psycopg.OperationalError as exc:
            raise BrokerUnavailableError(
                f"PostgreSQL at {self.config.where} (your connection): {exc}"
            ) from exc
        except psycopg.Error as exc:
            raise self._db.refused(exc) from exc

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
                stored_now = set(row[3])
                ids = [j.id for j in batch if j.id not in stored_now]
                found = conn.execute(self._q["stored_ids"], {"ids": ids})
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
        state = await self._db.state()
        # listen before the claim: a job committed after it must wake the wait that follows
        listener = await self._db.listener(state)
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

        async def op(conn: AsyncConn) -> tuple[set[int], list[TupleRow], TupleRow | None]:
            # one transaction, one round trip: outcomes, promotion of due jobs, the claim (and
            # now and then how far it walked the ready index: see postgres/vacuum.py). A claim
            # alone need not wait for the WAL flush: if a crash loses it, the job is queued
            # again and the claimant's finish is fenced out (at least once, as ever)
            async with pipelined_transaction(conn, durable=finish is not None):
                finished = await conn.execute(q["finish"], finish) if finish else None
                await conn.execute(q["promote_due"], {"channel": self.channel})
                claimed = await conn.execute(q["claim"], claim, binary=True)
                walked = await conn.execute(q["claim_walk"]) if probe else None
            applied = {r[0] for r in await finished.fetchall()} if finished else set()
            walk = await walked.fetchone() if walked is not None else None
            return applied, await claimed.fetchall(), walk

        started = time.monotonic()
        probe = self._vacuum_pacer.probe_due(started)
        applied, rows, walk = await self._db.run(op)
        state.marks[tuple(queues)] = mark
        if walk is not None:
            self._vacuum_if_walked_far(state, walk[0], walk[1], started)
        rows.sort(key=lambda r: (-r[6], r[9], r[0]))  # priority desc, run_at, enqueue order
        return [i in applied for i in range(len(finishes))], [job_from_row(r[1:]) for r in rows]

    def _vacuum_if_walked_far(
        self, state: LoopState, pages: int, scans: int, started: float
    ) -> None:
        if self._vacuum_pacer.after_claim(pages, scans, started, time.monotonic()):
            state.vacuum = asyncio.ensure_future(
                vacuum_jobs(
                    self._vacuum_pacer,
                    pages / scans,
                    self.config.conninfo,
                    self.url,
                    self.schema,
                    self._q,
                    self.config.unavailable_after_s,
                )
            )

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
            async with pipelined_transaction(conn):
                held = await conn.execute(q["extend_leases"], extend) if claims else None
                await conn.execute(q["upsert_worker"], me)
            return await held.fetchall() if held is not None else []

        rows = await self._db.run(op)
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
        rows = await self._db.fetch(self._q["finish"], params)
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
        await self._db.execute(self._q["progress"], params)

    @on_io_loop
    async def recover(self, max_lost_leases: int) -> list[tuple[str, JobState]]:
        params = {
            "max_lost_leases": max_lost_leases,
            "channel": self.channel,
            "error_type": RECOVERED_ERROR_TYPE,
            "message": RECOVERED_MESSAGE,
        }
        rows = await self._db.fetch(self._q["recover"], params)
        return [(r[0], JobState(r[1])) for r in rows]

    @on_io_loop
    async def wait(
        self, queues: Sequence[str], timeout: float, handover: HandOver | None = None
    ) -> list[Job]:
        # no hand-overs: a woken worker claims with SKIP LOCKED like everyone else
        state = await self._db.state()
        listener = await self._db.listener(state)
        since = state.marks.pop(tuple(queues), listener.seq)
        deadline = time.monotonic() + timeout
        # shielded: a worker cancels its wait when a job ends; a query cut off mid-flight
        # would make psycopg cancel it on the server, a connection of its own for nothing
        call = asyncio.ensure_future(self._db.fetch(self._q["next_due"], {"queues": list(queues)}))
        call.add_done_callback(_consume)
        rows = await asyncio.shield(call)
        due_in = rows[0][0] if rows else None
        if due_in is not None:
            deadline = min(deadline, time.monotonic() + max(0.0, due_in))
        await listener.wait(queues, since, deadline)
        return []

    @on_io_loop
    async def unregister_worker(self, worker_id: str) -> None:
        await self._db.execute(self._q["delete_worker"], {"id": worker_id})

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

        return await self._db.run(op)

    @on_io_loop
    async def health_warnings(self) -> dict[str, str]:
        rows = await self._db.fetch(self._q["oldest_snapshot"])
        if not rows:
            return {}
        pid, application, state, held_s, xmin_age = rows[0]
        if held_s is None or held_s < self.config.snapshot_warn_s:
            return {}
        return {
            "pinned_snapshot": (
                f"a transaction has held a snapshot for {held_s:.0f} s (pid {pid}, "
                f"application {application!r}, {state}; its xmin is {xmin_age} transactions "
                f"old): vacuum cannot remove the dead rows of {self.schema}.jobs meanwhile, "
                "and claims slow down as they pile up; end it, or set "
                "idle_in_transaction_session_timeout (snapshot_warn_s="
                f"{self.config.snapshot_warn_s:g})"
            )
        }

    # --- inspection and management ----------------------------------------------------------

    @on_io_loop
    async def now(self) -> float:
        return float((await self._db.fetch(self._q["now"]))[0][0])

    @on_io_loop
    async def get(self, job_id: str) -> Job | None:
        rows = await self._db.fetch(self._q["get"], {"id": job_id})
        return job_from_row(rows[0][1:]) if rows else None

    @on_io_loop
    async def get_by_key(self, key: str) -> Job | None:
        rows = await self._db.fetch(self._q["get_by_key"], {"key": key})
        return job_from_row(rows[0][1:]) if rows else None

    @on_io_loop
    async def get_many(self, job_ids: Sequence[str]) -> list[Job | None]:
        if not job_ids:
            return []
        rows = await self._db.fetch(self._q["get_many"], {"ids": list(dict.fromkeys(job_ids))})
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
        table_rows = await self._table_rows() if count else 0.0
        exact = count and table_rows <= ESTIMATE_ABOVE_ROWS

        async def op(conn: AsyncConn) -> tuple[list[TupleRow], int | None]:
            # one round trip, one snapshot: the count is of the data the page was read from
            async with pipelined_transaction(conn):
                await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                listed = await conn.execute(listing, page)
                counted = await conn.execute(q["count_jobs"], filters) if exact else None
            total = await counted.fetchone() if counted is not None else None
            return await listed.fetchall(), None if total is None else int(total[0])

        rows, total = await self._db.run(op)
        estimated = False
        if count and not exact:
            total, estimated = await self._large_total(query, filters, table_rows)
        next_cursor = None
        if len(rows) > limit:
            last = rows[limit - 1]
            position = (last[-1], last[0]) if query.order == "finished" else (last[0],)
            next_cursor = encode_cursor(query.order, *position)
        jobs = [job_from_row(r[1:25]) for r in rows[:limit]]
        return JobPage(jobs, next_cursor, total, total_estimated=estimated)

    async def _table_rows(self) -> float:
        ((rows,),) = await self._db.fetch(self._q["table_rows"])
        return float(rows)

    async def _large_total(
        self, query: JobQuery, filters: dict[str, Any], table_rows: float
    ) -> tuple[int, bool]:
        """A listing's total on a large table, and whether it is an estimate: waiting and
        running jobs counted (on their indexes), finished ones estimated."""
        states = query.states or frozenset(JobState)
        total = 0
        for state in sorted(states & _PENDING):
            ((n,),) = await self._db.fetch(self._q[f"count_{state.value}"], filters)
            total += int(n)
        finished = sorted(s.value for s in states - _PENDING)
        if not finished:
            return total, False
        of_finished = {**filters, "states": finished}
        if query.task is not None or query.meta:
            ((plan,),) = await self._db.fetch(self._q["estimate_finished"], of_finished)
            return total + int(plan[0]["Plan"]["Plan Rows"]), True
        estimates = await self._finished_estimates(table_rows)
        if estimates is None:  # no statistics to go by: count
            ((n,),) = await self._db.fetch(self._q["count_jobs"], of_finished)
            return total + int(n), False
        total += sum(
            n
            for (queue, state), n in estimates.items()
            if state in finished and query.queue in (None, queue)
        )
        return total, True

    async def _finished_estimates(self, table_rows: float) -> dict[tuple[str, str], int] | None:
        """Estimated finished jobs per (queue, state) from the statistics (migration 6); None
        if there are none (never analyzed, or not this role's table to read them of)."""
        rows = await self._db.fetch(self._q["finished_estimates"], {"schema": self.schema})
        if not rows:
            return None
        return {
            (queue, state): round(share * table_rows)
            for queue, state, share in rows
            if state in _FINISHED_NAMES
        }

    @on_io_loop
    async def finished_per_minute(
        self, since: float, queue: str | None = None
    ) -> list[tuple[int, JobState, int]]:
        rows = await self._db.fetch(
            self._q["finished_per_minute"], {"since": since, "queue": queue}
        )
        return [(int(m), JobState(state), int(n)) for m, state, n in rows]

    @on_io_loop
    async def delete(self, job_ids: Sequence[str]) -> list[str]:
        if not job_ids:
            return []
        rows = await self._db.fetch(self._q["delete_finished"], {"ids": list(job_ids)})
        deleted = {row[0] for row in rows}
        return [job_id for job_id in dict.fromkeys(job_ids) if job_id in deleted]

    @on_io_loop
    async def stats(self) -> list[QueueStats]:
        by_queue: dict[str, QueueStats] = {}

        def of(queue: str) -> QueueStats:
            if queue not in by_queue:
                by_queue[queue] = QueueStats(queue=queue, counts={s.value: 0 for s in JobState})
            return by_queue[queue]

        table_rows = await self._table_rows()
        estimates = None
        if table_rows > ESTIMATE_ABOVE_ROWS:
            estimates = await self._finished_estimates(table_rows)
        params = {"count_finished": estimates is None}
        for kind, queue, job_state, value in await self._db.fetch(self._q["stats"], params):
            stats = of(queue)
            if kind == "count":
                stats.counts[job_state] = int(value)
            elif kind == "oldest":
                stats.oldest_waiting_s = max(0.0, value)
            else:
                stats.paused = bool(value)
        if estimates is not None:
            for (queue, job_state), n in estimates.items():
                of(queue).counts[job_state] = n
            for stats in by_queue.values():
                stats.estimated = list(_FINISHED_NAMES)
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
            for r in await self._db.fetch(self._q["workers"])
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
            ids = await self._db.run(op)
            if ids is not None:
                return ids
        return []

    @on_io_loop
    async def cancel(self, job_id: str) -> JobState | None:
        rows = await self._db.fetch(self._q["cancel"], {"id": job_id})
        return JobState(rows[0][0]) if rows else None

    @on_io_loop
    async def run_now(self, job_id: str) -> JobState | None:
        rows = await self._db.fetch(self._q["run_now"], {"id": job_id, "channel": self.channel})
        return JobState(rows[0][0]) if rows else None

    @on_io_loop
    async def purge(self, queue: str) -> int:
        return await self._db.execute(self._q["purge"], {"queue": queue})

    @on_io_loop
    async def pause(self, queue: str, paused: bool) -> None:
        params = {"queue": queue, "paused": paused, "channel": self.channel}
        await self._db.execute(self._q["pause"], params)

    @on_io_loop
    async def schedule_marks(self) -> dict[str, float]:
        return {name: float(tick) for name, tick in await self._db.fetch(self._q["schedule_marks"])}

    @on_io_loop
    async def mark_schedules(self, marks: Mapping[str, float]) -> None:
        if marks:
            params = {"names": list(marks), "ticks": list(marks.values())}
            await self._db.execute(self._q["mark_schedules"], params)

    @on_io_loop
    async def save_workflow(self, workflow_id: str, spec: bytes) -> None:
        await self._db.execute(self._q["save_workflow"], {"id": workflow_id, "spec": spec})

    @on_io_loop
    async def get_workflow(self, workflow_id: str) -> WorkflowRecord | None:
        rows = await self._db.fetch(self._q["get_workflow"], {"id": workflow_id})
        if not rows:
            return None
        wf_id, spec, state, created, finished = rows[0]
        return WorkflowRecord(
            wf_id, bytes(spec), state, float(created), float(finished) if finished else None
        )

    @on_io_loop
    async def end_workflow(self, workflow_id: str, state: str) -> bool:
        params = {"id": workflow_id, "state": state}
        return await self._db.execute(self._q["end_workflow"], params) == 1

    @on_io_loop
    async def reopen_workflow(self, workflow_id: str) -> bool:
        return await self._db.execute(self._q["reopen_workflow"], {"id": workflow_id}) == 1

    @on_io_loop
    async def running_workflows(self, limit: int = 1000) -> list[str]:
        return [r[0] for r in await self._db.fetch(self._q["running_workflows"], {"limit": limit})]

    @on_io_loop
    async def reserve_rate_slot(self, bucket: str, interval_s: float) -> float:
        params = {"bucket": bucket, "interval": interval_s}
        rows = await self._db.fetch(self._q["reserve_rate_slot"], params)
        return max(0.0, float(rows[0][0]))

    @on_io_loop
    async def acquire_slot(self, bucket: str, holder: str, limit: int, ttl_s: float) -> bool:
        q = self._q
        params = {"bucket": bucket, "holder": holder, "limit": limit, "ttl": ttl_s}

        async def op(conn: AsyncConn) -> bool:
            async with pipelined_transaction(conn):
                await conn.execute(q["lock_slots"], {"lock_class": _SLOT_LOCK, "bucket": bucket})
                held = await conn.execute(q["acquire_slot"], params)
            return bool(await held.fetchall())

        return await self._db.run(op)

    @on_io_loop
    async def release_slot(self, bucket: str, holder: str) -> None:
        await self._db.execute(self._q["release_slot"], {"bucket": bucket, "holder": holder})

    @on_io_loop
    async def queue_depth(self, queue: str) -> int:
        return int((await self._db.fetch(self._q["queue_depth"], {"queue": queue}))[0][0])

    @on_io_loop
    async def publish_events(self, payload: bytes) -> None:
        params = {"channel": self.events_channel, "payload": payload.decode()}
        await self._db.execute("SELECT pg_notify(%(channel)s, %(payload)s)", params)

    def events_subscription(self) -> Subscription:
        return PostgresSubscription(self.config.conninfo, self.events_channel)
