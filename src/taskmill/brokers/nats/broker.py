"""The NATS JetStream broker: ``App("nats://127.0.0.1:4222")``.

The job record is the truth and the stream only dispatches (docs/brokers.md, "NATS"):

- a job's record lives in the ``jobs`` KV bucket and changes only by compare-and-set on its
  revision; the record's lease token is the fencing token, and a worker whose CAS fails
  writes nothing and acknowledges nothing;
- a pointer (``records.Pointer``) on the ``dispatch`` work-queue stream says which job to run
  next, one subject per queue and priority (``lane``), one durable pull consumer each, pulled
  highest priority first; a claim acknowledges its pointer as soon as the record is claimed,
  so no consumer slot is held while a job runs and no late acknowledgement can reach a
  newer delivery;
- a send writes pointer and record together (one round trip). A pointer stored without its
  record (a send that died) is made whole by the worker that takes it: the pointer carries
  the job, or, for a large payload, is dropped once older than a grace period. A record
  stored without its pointer (a server that crashed in between) is dispatched again by the
  workers' sweep, deduplicated by the pointer's message id (``_sweep``).
- delays and retries wait as the server's scheduled messages (nats-server 2.12+) or, on older
  servers, in a per-minute subject a promoter in the workers moves; never as a NAK with delay,
  which holds a consumer slot until it fires.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

import msgspec

from taskmill.brokers._io import on_io_loop
from taskmill.brokers.base import (
    Broker,
    Capabilities,
    EnqueueResult,
    HeartbeatReply,
    OnConflict,
)
from taskmill.brokers.nats.claiming import Claiming
from taskmill.brokers.nats.config import token
from taskmill.brokers.nats.connection import (
    ATOMIC_BATCH_MAX,
    BUCKETS,
    CasError,
    ack_seq,
    batch_ack,
)
from taskmill.brokers.nats.core import CAS_TRIES
from taskmill.brokers.nats.features import Features
from taskmill.brokers.nats.records import (
    Record,
    new_record,
    record_decoder,
    record_encoder,
    set_apart,
)
from taskmill.brokers.nats.recovery import SWEEP_S
from taskmill.brokers.nats.store import Entry, put_result
from taskmill.errors import BrokerError, DuplicateJobError, PayloadTooLargeError
from taskmill.job import (
    Cancelled,
    Claim,
    ErrorInfo,
    Failed,
    Finish,
    Job,
    JobState,
    NewJob,
    Progress,
    Released,
    RetryAt,
    Succeeded,
    WorkerInfo,
)
from taskmill.settings import Settings

log = logging.getLogger("taskmill.brokers.nats")

_EXPECTED_LAST = "Nats-Expected-Last-Subject-Sequence"
_ATOMIC_DISABLED = 10174
"""nats-server's "atomic publish is disabled" (on this stream)."""
_SLICES_IN_FLIGHT = 8
"""Slices sent before their acknowledgements are awaited: nats-server takes at most 50
batches under way on a stream (from every producer together)."""
_BATCH_BYTES = 8 * 1024 * 1024
"""An atomic batch is held by the server until its last message: at most this much in one."""

_worker_encoder = msgspec.msgpack.Encoder()


# Features before Claiming (a Recovery): its _prune_workflows must override Admin's empty
# one, or ended workflows are never pruned.
class NatsBroker(Features, Claiming, Broker):
    name = "nats"
    capabilities = Capabilities(
        shared_across_processes=True,
        server_clock=True,
        transactional_enqueue=False,
        push_wakeups=True,
    )

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.max_lost_leases = Settings().max_lost_leases
        self.result_ttl_s = Settings().result_ttl_s
        self._held = {}
        self._recovered = []
        self._mine = {}
        self._sweep_at = time.monotonic() + SWEEP_S
        self._back_in_sight = 0.0

    def configure(self, settings: Settings) -> None:
        self.max_lost_leases = settings.max_lost_leases
        self.result_ttl_s = settings.result_ttl_s

    # --- life cycle -----------------------------------------------------------------------

    @on_io_loop
    async def open(self) -> None:
        await self._retrying(self._session)

    @on_io_loop
    async def epoch(self, *, mark: bool = False) -> str | None:
        return await self.read_epoch(mark=mark)

    async def close(self) -> None:
        await self.detach()
        if self._io is not None:
            with contextlib.suppress(Exception):
                await self._close_io_session()
            self._io.close()
            self._io = None

    @on_io_loop
    async def _close_io_session(self) -> None:
        await self._close_session(asyncio.get_running_loop())

    async def attach(self) -> None:
        loop = asyncio.get_running_loop()
        self._detached.discard(loop)
        self._attached.add(loop)

    async def detach(self) -> None:
        loop = asyncio.get_running_loop()
        if loop not in self._attached:
            return
        self._attached.discard(loop)
        self._detached.add(loop)
        await self._close_session(loop)

    def storage_blocking(self) -> list[dict[str, Any]]:
        """Create the streams and buckets now if they are missing, and describe each as the
        server has it (``taskmill migrate`` prints this)."""
        future = asyncio.run_coroutine_threadsafe(self._storage(), self._io_loop())
        return future.result()

    async def _storage(self) -> list[dict[str, Any]]:
        session = await self._retrying(self._session)
        js = session.nc.jetstream()
        names = [self.config.dispatch_stream]
        names += [f"KV_{self.config.bucket(what)}" for what in BUCKETS]
        described = []
        for name in names:
            info = await js.stream_info(name)
            c = info.config
            described.append(
                {
                    "stream": name,
                    "subjects": list(c.subjects or []),
                    # nats-py gives these as enums or as plain strings, depending on the call
                    "retention": str(getattr(c.retention, "value", c.retention) or ""),
                    "storage": str(getattr(c.storage, "value", c.storage) or ""),
                    "replicas": c.num_replicas,
                    "max_msgs_per_subject": c.max_msgs_per_subject,
                    "max_age_s": c.max_age,
                    "duplicate_window_s": c.duplicate_window,
                    "scheduled_messages": bool(c.allow_msg_schedules),
                    "messages": info.state.messages,
                }
            )
        return described

    @on_io_loop
    async def now(self) -> float:
        return await self._fresh_now()

    # --- producers ------------------------------------------------------------------------

    @on_io_loop
    async def enqueue(
        self, jobs: Sequence[NewJob], *, on_conflict: OnConflict = "return"
    ) -> EnqueueResult:
        # one enqueue order for every try: a try after a lost reply finds its own records
        base = time.time_ns()
        return await self._retrying(lambda: self._enqueue(jobs, on_conflict, base))

    def enqueue_blocking(
        self,
        jobs: Sequence[NewJob],
        *,
        on_conflict: OnConflict = "return",
        connection: Any = None,
    ) -> EnqueueResult:
        if connection is not None:
            raise TypeError("the NATS broker has no transactions: connection= is not supported")
        # the I/O loop's own coroutine, not ``self.enqueue``: one broker call per send
        base = time.time_ns()
        future = asyncio.run_coroutine_threadsafe(
            self._retrying(lambda: self._enqueue(jobs, on_conflict, base)), self._io_loop()
        )
        return future.result()

    async def _enqueue(
        self, jobs: Sequence[NewJob], on_conflict: OnConflict, base: int
    ) -> EnqueueResult:
        result = EnqueueResult(ids=[j.id for j in jobs])
        now = await self._fresh_now()
        fresh: list[tuple[int, Record]] = []
        seen: set[str] = set()
        for i, job in enumerate(jobs):
            if job.id in seen:
                result.existing.add(i)
                continue
            seen.add(job.id)
            fresh.append((i, new_record(job, now, base + i)))
        encoded, payloads = await self._encoded_within_limit([r for _, r in fresh])
        await self._reserve_keys(fresh, result, on_conflict)
        fresh = [(i, r) for i, r in fresh if i not in result.existing]
        for queue, priority in {(r.queue, r.priority) for _, r in fresh}:
            await self._ensure_lane(queue, priority)
        created = await self._store_new([r for _, r in fresh], encoded, payloads)
        lost = [
            (i, r) for (i, r), rev in zip(fresh, created, strict=True) if not isinstance(rev, int)
        ]
        if lost:
            await self._settle_existing(lost, result)
        await self._announce_ready({r.queue for _, r in fresh if r.state is JobState.QUEUED})
        return result

    async def _store_new(
        self,
        records: list[Record],
        encoded: dict[str, bytes],
        payloads: dict[str, bytes] | None = None,
    ) -> list[int | CasError]:
        """Each new job's pointer and record, sent together: one round trip for a send (two
        when a payload is stored apart: it is written first, ``_store_payloads``).

        A pointer refused while its record was stored would leave a job nobody dispatches,
        so that record is taken back before the error is raised; what a crash in between
        leaves (a record whose pointer was never stored) the workers' sweep sends again
        (``_sweep``). A pointer stored without its record is made whole by the worker that
        takes it (``_claimable``). Many jobs go as atomic batches where the server takes them
        (``_store_batched``)."""
        if not records:
            return []
        if payloads:
            await self._store_payloads({r.id: payloads[r.id] for r in records if r.id in payloads})
        if len(records) > 1 and self.atomic_batches:
            return await self._store_batched(records, encoded)
        return await self._store_each(records, encoded)

    async def _store_each(
        self, records: list[Record], encoded: dict[str, bytes]
    ) -> list[int | CasError]:
        """``_store_new`` message by message: every write its own reply."""
        session = await self._session()
        pointers = await self._send_pointers(records, first=True)
        puts = await self._send_puts("jobs", [(token(r.id), encoded[r.id], 0) for r in records])
        replies = await session.requests.replies(pointers + puts)
        created = [put_result(msg) for msg in replies[len(records) :]]
        refused: BrokerError | None = None
        for msg, rev in zip(replies[: len(records)], created, strict=True):
            try:
                ack_seq(msg)
            except BrokerError as exc:
                refused = exc
                if isinstance(rev, int):
                    await self._erase("jobs", [rev])
        if refused is not None:
            raise refused
        return created

    async def _store_batched(
        self, records: list[Record], encoded: dict[str, bytes]
    ) -> list[int | CasError]:
        """``_store_new`` as atomic batches (nats-server 2.12): per slice of jobs, the records
        in one batch (each still a create: expected last subject sequence 0), then the
        pointers in another; one reply per batch instead of one per message, awaited together
        (``_SLICES_IN_FLIGHT`` slices at a time). A batch is stored whole or not at all, so a
        producer that dies part-way leaves what a single send's death leaves (pointers
        without records, taken by the workers; records without pointers, sent again by the
        sweep). A batch the server refuses (a job id stored already, a pointer already sent,
        too many batches under way) is sent again message by message (``_store_each``),
        which sorts out each job."""
        session = await self._session()
        created: list[int | CasError] = []
        slices = _slices(records, encoded)
        for start in range(0, len(slices), _SLICES_IN_FLIGHT):
            window = slices[start : start + _SLICES_IN_FLIGHT]
            acks = []
            for part in window:
                puts = [
                    (self._subject("jobs", token(r.id)), encoded[r.id], {_EXPECTED_LAST: "0"})
                    for r in part
                ]
                acks.append(await session.requests.send_batch(puts))
                acks.append(await session.requests.send_batch(self._pointer_messages(part, True)))
            replies = await session.requests.replies(acks)
            for n, part in enumerate(window):
                stored, dispatched = batch_ack(replies[2 * n]), batch_ack(replies[2 * n + 1])
                if isinstance(stored, tuple) and isinstance(dispatched, tuple):
                    last, count = stored
                    created += range(last - count + 1, last + 1)
                    continue
                for refusal in (stored, dispatched):
                    if isinstance(refusal, dict) and refusal.get("err_code") == _ATOMIC_DISABLED:
                        self.atomic_batches = False  # the stream was changed under us
                created += await self._store_each(part, encoded)
        return created

    async def _encoded_within_limit(
        self, records: Sequence[Record]
    ) -> tuple[dict[str, bytes], dict[str, bytes]]:
        """Each record encoded (by job id), once, its payload set apart if large
        (``records.set_apart``: those payloads are the second dict). A record and a payload
        must each fit in one NATS message (the server's ``max_payload``, 1 MB by default),
        said before anything is written rather than failing half-way."""
        session = await self._session()
        limit = session.nc.max_payload
        payloads = set_apart(records)
        encoded: dict[str, bytes] = {}
        for record in records:
            encoded[record.id] = record_encoder.encode(record)
            size = len(encoded[record.id]) + 512  # the result and error come later
            size = max(size, len(payloads.get(record.id, b"")))
            if size > limit:
                raise PayloadTooLargeError(
                    f"job {record.id} ({record.task}) is {size} bytes stored, more than the "
                    f"max_payload of {limit} bytes that the NATS server at "
                    f"{self.config.where} allows: raise max_payload in the server's "
                    "configuration (docs/brokers.md, NATS), or send less"
                )
        return encoded, payloads

    async def _settle_existing(self, lost: list[tuple[int, Record]], result: EnqueueResult) -> None:
        """Records that were there before ours: the same job stored already, a record a
        worker made from our own pointer (ours, then), or a marker of a deleted job."""
        entries = await self._get_many("jobs", [token(r.id) for _, r in lost])
        retry: list[tuple[int, Record, int]] = []
        for (i, record), entry in zip(lost, entries, strict=True):
            if entry is not None and entry.deleted:
                retry.append((i, record, entry.revision))
                continue
            if entry is not None and record_decoder.decode(entry.value).seq == record.seq:
                continue  # a worker took our pointer first and made the record from it
            result.existing.add(i)
            if record.key is not None:
                await self._release_key(record.key, record.id)
        if retry:
            writes = [(token(r.id), record_encoder.encode(r), rev) for _, r, rev in retry]
            for (i, _, _), rev in zip(retry, await self._put_many("jobs", writes), strict=True):
                if not isinstance(rev, int):
                    result.existing.add(i)

    async def _reserve_keys(
        self, fresh: list[tuple[int, Record]], result: EnqueueResult, on_conflict: OnConflict
    ) -> None:
        keyed = [(i, r) for i, r in fresh if r.key is not None]
        if not keyed:
            return
        mine: list[Record] = []
        taken: dict[str, str] = {}
        for i, record in keyed:
            assert record.key is not None
            holder = taken.get(record.key) or await self._take_key(record.key, record.id)
            if holder == record.id:
                taken[record.key] = record.id
                mine.append(record)
                continue
            if holder == record.id or on_conflict == "return":
                result.ids[i] = holder
                result.existing.add(i)
                continue
            for own in mine:
                assert own.key is not None
                await self._release_key(own.key, own.id)
            raise DuplicateJobError(record.key, holder)

    # --- workers --------------------------------------------------------------------------

    @on_io_loop
    async def finish_and_claim(
        self,
        finishes: Sequence[Finish],
        queues: Sequence[str],
        limit: int,
        worker_id: str,
        lease_s: float,
    ) -> tuple[list[bool], list[Job]]:
        if not finishes:
            return [], await self.claim(queues, limit, worker_id, lease_s)
        # together: a claim does not wait on the finishes' round trips (neither reads what
        # the other writes; both add to the worker's lease entry, which writes again when it
        # changed under a write, ``_write_lease``)
        applied, claimed = await asyncio.gather(
            self.finish(finishes), self.claim(queues, limit, worker_id, lease_s)
        )
        return applied, claimed

    @on_io_loop
    async def heartbeat(
        self, worker: WorkerInfo, claims: Sequence[Claim], lease_s: float
    ) -> HeartbeatReply:
        now = await self._fresh_now()
        expires = now + lease_s
        reply = HeartbeatReply()
        # added to, not replaced: the worker listed its claims when this call began, and a
        # claim that landed since must stay in the lease entry (else a kill now would leave
        # that job to the 30 s sweep instead of the lease); finishes take their own out
        held = self._held.setdefault(worker.id, {})
        held.update({c.job_id: c.token for c in claims})
        info = msgspec.structs.replace(worker, heartbeat_at=now)
        await asyncio.gather(
            self._put("workers", token(worker.id), _worker_encoder.encode(info)),
            self._write_lease(worker.id, expires),
        )

        def extend(record: Record) -> Record | None:
            if record.cancel_requested:
                reply.cancel_requested.add(record.id)
            return msgspec.structs.replace(record, lease_expires_at=expires)

        kept = await self._update_held(claims, extend)
        reply.lost.update(c.job_id for c in claims if c.job_id not in kept)
        for job_id in reply.lost:
            held.pop(job_id, None)
        return reply

    async def _update_held(self, claims: Sequence[Claim], change: Any) -> set[str]:
        """CAS ``change(record)`` onto each running record the claim still holds (again on a
        lost CAS, from a fresh read). The ids still held."""
        held: set[str] = set()
        todo = list(claims)
        stale: set[str] = set()
        for _ in range(CAS_TRIES):
            if not todo:
                break
            found = await self._held_records(todo, stale)
            writes: list[tuple[str, bytes, int | None]] = []
            pending: list[tuple[Claim, Record]] = []
            for claim, hit in zip(todo, found, strict=True):
                if hit is None:
                    continue
                new = change(hit[1])
                if new is None:
                    held.add(claim.job_id)
                    continue
                writes.append((token(claim.job_id), record_encoder.encode(new), hit[0]))
                pending.append((claim, new))
            results = await self._put_many("jobs", writes)
            todo = []
            for (claim, new), rev in zip(pending, results, strict=True):
                if isinstance(rev, int):
                    held.add(claim.job_id)
                    self._mine[claim.job_id] = (rev, new)
                else:
                    stale.add(claim.job_id)
                    todo.append(claim)
        return held

    async def _held_records(
        self, claims: Sequence[Claim], stale: set[str]
    ) -> list[tuple[int, Record] | None]:
        """(revision, record) of each claim's job while the claim holds it, else None.

        This process's own last write is used where it has one (no read: a finish costs one
        round trip); ``stale`` names jobs whose CAS on it lost, read afresh. Records that no
        longer hold their claim are read again from the leader, as a replica may not have the
        claim's write yet (a claim judged lost on an old value would be dropped by its worker
        while its record says running)."""
        found: list[tuple[int, Record] | None] = [None] * len(claims)
        unread: list[int] = []
        for i, claim in enumerate(claims):
            mine = None if claim.job_id in stale else self._mine.get(claim.job_id)
            if mine is not None and mine[1].lease_token == claim.token:
                found[i] = mine
            else:
                unread.append(i)
        for leader in (False, True):
            if not unread:
                break
            keys = [token(claims[i].job_id) for i in unread]
            entries = await self._get_many("jobs", keys, leader=leader)
            doubtful = []
            for i, entry in zip(unread, entries, strict=True):
                record = _holding(entry, claims[i])
                if record is None or entry is None:
                    doubtful.append(i)
                else:
                    found[i] = (entry.revision, record)
            unread = doubtful
        for i in unread:
            self._mine.pop(claims[i].job_id, None)  # not held: nothing of ours to remember
        return found

    @on_io_loop
    async def finish(self, finishes: Sequence[Finish]) -> list[bool]:
        now = await self._fresh_now()
        applied = [False] * len(finishes)
        todo = list(enumerate(finishes))
        stale: set[str] = set()
        for _ in range(CAS_TRIES):
            if not todo:
                break
            todo = await self._finish_round(todo, stale, now, applied)
        return applied

    async def _finish_round(
        self, todo: list[tuple[int, Finish]], stale: set[str], now: float, applied: list[bool]
    ) -> list[tuple[int, Finish]]:
        """One CAS per job still held: what is left for another round (a lost CAS, or a
        second finish of a job in the batch)."""
        found = await self._held_records([f.claim for _, f in todo], stale)
        limit = (await self._session()).nc.max_payload
        writes: list[tuple[str, bytes, int | None]] = []
        done: list[tuple[int, Finish, Record]] = []
        later: list[tuple[int, Finish]] = []
        for (i, f), hit in zip(todo, found, strict=True):
            if hit is None:
                continue
            if any(new.id == hit[1].id for _, _, new in done):
                later.append((i, f))
                continue
            new = _finished(hit[1], f, now)
            encoded = record_encoder.encode(new)
            if len(encoded) > limit:
                new = _finished(
                    hit[1], Finish(f.claim, Failed(_too_large(len(encoded), limit))), now
                )
                encoded = record_encoder.encode(new)
            writes.append((token(new.id), encoded, hit[0]))
            done.append((i, f, new))
        await self._dispatch([new for _, _, new in done if not new.state.finished])
        results = await self._put_many("jobs", writes)
        for (i, f, new), rev in zip(done, results, strict=True):
            if isinstance(rev, int):
                applied[i] = True
                await self._landed(new)
            else:
                stale.add(new.id)
                later.append((i, f))
        await self._announce_ready(
            {new.queue for _, _, new in done if new.state is JobState.QUEUED}
        )
        return later

    async def _landed(self, new: Record) -> None:
        self._mine.pop(new.id, None)
        for held in self._held.values():
            held.pop(new.id, None)
        if new.state.finished and new.key is not None:
            await self._release_key(new.key, new.id)

    @on_io_loop
    async def record_progress(self, items: Sequence[Progress]) -> None:
        latest = {p.claim.job_id: p for p in items}

        def progress(record: Record) -> Record:
            p = latest[record.id]
            return msgspec.structs.replace(record, progress=p.fraction, progress_message=p.message)

        await self._update_held([p.claim for p in latest.values()], progress)

    @on_io_loop
    async def unregister_worker(self, worker_id: str) -> None:
        self._held.pop(worker_id, None)
        await self._delete("workers", token(worker_id))
        await self._delete("leases", token(worker_id))


def _too_large(size: int, limit: int) -> ErrorInfo:
    """The error of a job whose result does not fit in one NATS message: failing it is the
    one outcome that can be stored (retrying would make the same result again)."""
    return ErrorInfo(
        "taskmill.errors.PayloadTooLargeError",
        f"the job's record with its result is {size} bytes, more than the max_payload of "
        f"{limit} bytes the NATS server allows: return a reference to large data (a file, an "
        "object store key), or raise max_payload in the server's configuration",
    )


def _holding(entry: Entry | None, claim: Claim) -> Record | None:
    if entry is None or entry.deleted:
        return None
    record = record_decoder.decode(entry.value)
    if record.state is not JobState.RUNNING or record.lease_token != claim.token:
        return None
    return record


def _finished(record: Record, finish: Finish, now: float) -> Record:
    o = finish.outcome
    new = msgspec.structs.replace(record, lease_token=None, lease_expires_at=None)
    if isinstance(o, Succeeded):
        new.state, new.result, new.finished_at = JobState.SUCCEEDED, o.result, now
    elif isinstance(o, Failed):
        new.state, new.error, new.finished_at = JobState.FAILED, o.error, now
    elif isinstance(o, Cancelled):
        new.state, new.finished_at = JobState.CANCELLED, now
    elif isinstance(o, RetryAt):
        new.error, new.run_at, new.worker_id = o.error, o.run_at, None
        new.state = JobState.QUEUED if o.run_at <= now else JobState.SCHEDULED
        new.gen = record.gen + 1
    elif isinstance(o, Released):
        new.attempt = max(0, record.attempt - 1)
        new.worker_id = new.started_at = None
        new.state = JobState.QUEUED if record.run_at <= now else JobState.SCHEDULED
        new.gen = record.gen + 1
    return new


def _slices(records: list[Record], encoded: dict[str, bytes]) -> list[list[Record]]:
    """``records`` in slices of at most ``ATOMIC_BATCH_MAX`` jobs and about ``_BATCH_BYTES``
    (a pointer may carry its job: twice a record's size counted)."""
    slices: list[list[Record]] = [[]]
    size = 0
    for record in records:
        grows = 2 * len(encoded[record.id])
        if slices[-1] and (len(slices[-1]) >= ATOMIC_BATCH_MAX or size + grows > _BATCH_BYTES):
            slices.append([])
            size = 0
        slices[-1].append(record)
        size += grows
    return slices


__all__ = ["NatsBroker"]
