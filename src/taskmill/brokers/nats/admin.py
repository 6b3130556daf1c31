"""Inspection and management on NATS: listing, counting, retrying, cancelling, pausing.

NATS keeps no index beside a bucket's keys, so listings and counts read every record of the
``jobs`` bucket (an ordered consumer, about 20,000 records a second here): fine for a
queue of thousands of jobs, slow for millions. Everything here keeps a worker's hot path
(claims and finishes) out of it. Pausing a queue pauses its pull consumers on the server, so a
paused queue costs the workers nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import msgspec

from taskmill.brokers._io import on_io_loop
from taskmill.brokers.base import Broker, JobPage, JobQuery, decode_cursor, encode_cursor
from taskmill.brokers.nats.config import token, untoken
from taskmill.brokers.nats.connection import CasError
from taskmill.brokers.nats.core import CAS_TRIES, Core
from taskmill.brokers.nats.records import Record, record_decoder, record_encoder
from taskmill.brokers.nats.store import Entry
from taskmill.job import FINISHED_STATES, Job, JobState, QueueStats, WorkerInfo

log = logging.getLogger("taskmill.brokers.nats")
_CURSOR_TYPES: dict[str, tuple[type, ...]] = {"enqueued": (int, str), "finished": (float, int)}
_worker_decoder = msgspec.msgpack.Decoder(WorkerInfo)
_Change = Callable[[Record], Awaitable[Record | None]]
T = TypeVar("T")


class Admin(Core, Broker):
    async def _judged(self, judge: Callable[[Record], T | None]) -> dict[str, tuple[int, T]]:
        """What ``judge`` makes of each stored job's record (None: nothing), by key, with the
        record's revision. Records are judged as the scan brings them and only what ``judge``
        returns is kept: holding the records made a listing's memory follow the bucket,
        payloads and all (``prune`` below says how much). A job written while the scan runs
        comes again, and its newer record decides."""

        def keep(key: str, entry: Entry) -> tuple[int, T] | None:
            if entry.deleted:
                return None
            try:
                record = record_decoder.decode(entry.value)
            except msgspec.DecodeError as exc:  # set aside by the claim that meets it
                log.warning("a scan leaves out job record %r, unreadable: %r", key, exc)
                return None
            judged = judge(record)
            return None if judged is None else (entry.revision, judged)

        return await self._scan_kept("jobs", keep)

    @on_io_loop
    async def get(self, job_id: str) -> Job | None:
        return (await self.get_many([job_id]))[0]

    @on_io_loop
    async def get_many(self, job_ids: Sequence[str]) -> list[Job | None]:
        entries = await self._retrying(lambda: self._get_many("jobs", [token(i) for i in job_ids]))
        records = [
            None if e is None or e.deleted else record_decoder.decode(e.value) for e in entries
        ]
        jobs = iter(await self._retrying(lambda: self._jobs([r for r in records if r])))
        return [None if r is None else next(jobs) for r in records]

    @on_io_loop
    async def get_by_key(self, key: str) -> Job | None:
        entry = await self._get("keys", token(key))
        if entry is None or entry.deleted:
            return None
        job = await self.get(entry.value.decode())
        return None if job is None or job.state.finished else job

    @on_io_loop
    async def find_jobs(
        self, query: JobQuery, *, limit: int = 100, cursor: str | None = None, count: bool = False
    ) -> JobPage:
        by_finish = query.order == "finished"

        def sort_key(r: Record) -> tuple[float | int | str, ...] | None:
            if not _matches(query, r):
                return None
            return (r.finished_at or 0.0, r.seq) if by_finish else (r.seq, r.id)

        found = await self._judged(sort_key)
        keyed = sorted(((key, job_key) for job_key, (_, key) in found.items()), reverse=True)
        if cursor is not None:
            after = tuple(decode_cursor(cursor, query.order, _CURSOR_TYPES[query.order]))
            keyed = [(k, j) for k, j in keyed if k < after]
        page = keyed[:limit]
        # the page's records read again, whole: one may have changed since the scan (its
        # latest is shown, as the other brokers' listings do) or gone (left out)
        entries = await self._get_many("jobs", [job_key for _, job_key in page])
        records = [record_decoder.decode(e.value) for e in entries if e and not e.deleted]
        return JobPage(
            jobs=await self._jobs(records),
            next_cursor=encode_cursor(query.order, *page[-1][0]) if len(keyed) > limit else None,
            total=len(found) if count else None,
        )

    @on_io_loop
    async def delete(self, job_ids: Sequence[str]) -> list[str]:
        deleted: list[str] = []
        apart: list[str] = []
        entries = await self._get_many("jobs", [token(i) for i in job_ids])
        for job_id, entry in zip(job_ids, entries, strict=True):
            if entry is None or entry.deleted:
                continue
            record = record_decoder.decode(entry.value)
            if record.state in FINISHED_STATES and await self._delete(
                "jobs", token(job_id), entry.revision
            ):
                deleted.append(job_id)
                if record.apart:
                    apart.append(job_id)
        await self._drop_payloads(apart)
        return deleted

    @on_io_loop
    async def prune(self, finished_before: float, limit: int = 1000) -> int:
        """Finished jobs (and markers of deleted ones) older than given are erased, leaving
        no marker; so are ended workflows.

        Each record is judged as the scan delivers it and only the revisions to erase are
        kept: holding the whole bucket made a worker's memory follow the records stored,
        payloads and all (689 MiB against 37 in T9 at full size, where 2,500 of the stored
        records are 200-260 KB).

        The scan ends at the first record stored after ``finished_before``: a record is
        stored when it finishes or later, so none after it finished before. (A finished
        record written again later, set aside as unreadable say, waits for a later prune.)
        With results kept 7 days, the scan of every worker every minute read the whole
        bucket to find nothing."""
        found = await self._scan_kept(
            "jobs",
            lambda key, entry: _prunable(key, entry, finished_before),
            limit=limit,
            stored_before=finished_before,
        )
        pruned = await self._erase("jobs", [revision for revision, _ in found.values()])
        await self._drop_payloads([untoken(key) for key, (_, apart) in found.items() if apart])
        await self._prune_workflows(finished_before)
        return pruned

    async def _prune_workflows(self, finished_before: float) -> None:
        """Feature stores erase what they keep (``features.Features``)."""

    @on_io_loop
    async def stats(self) -> list[QueueStats]:
        now = await self._fresh_now()
        out: dict[str, QueueStats] = {}
        for queue in await self._paused_queues():
            out[queue] = QueueStats(queue, {s.value: 0 for s in JobState}, None, True)
        found = await self._judged(lambda r: (r.queue, r.state, r.run_at))
        for _, (queue, state, run_at) in found.values():
            qs = out.setdefault(queue, QueueStats(queue, {s.value: 0 for s in JobState}))
            qs.counts[state.value] += 1
            if state is JobState.QUEUED:
                qs.oldest_waiting_s = max(qs.oldest_waiting_s or 0.0, max(0.0, now - run_at))
        paused = set(await self._paused_queues())
        for qs in out.values():
            qs.paused = qs.queue in paused
        return [out[name] for name in sorted(out)]

    @on_io_loop
    async def list_workers(self) -> list[WorkerInfo]:
        workers = [
            _worker_decoder.decode(entry.value)
            async for _, entry in self._scan("workers")
            if not entry.deleted
        ]
        return sorted(workers, key=lambda w: w.started_at)

    async def _change(self, job_id: str, change: _Change) -> tuple[Record | None, Record | None]:
        """CAS ``change(record)`` onto a job's record (again from a fresh read when it lost):
        (the record before, the record written, or None when ``change`` wrote nothing)."""
        for _ in range(CAS_TRIES):
            entry = await self._get("jobs", token(job_id))
            if entry is None or entry.deleted:
                return None, None
            before = record_decoder.decode(entry.value)
            after = await change(before)
            if after is None:
                return before, None
            try:
                await self._put("jobs", token(job_id), record_encoder.encode(after), entry.revision)
            except CasError:
                continue
            return before, after
        return None, None

    @on_io_loop
    async def retry(self, job_ids: Sequence[str] | None) -> list[str]:
        if job_ids is None:
            failed = await self._judged(lambda r: r.id if r.state is JobState.FAILED else None)
            job_ids = [job_id for _, job_id in failed.values()]
        now = await self._fresh_now()
        done: list[str] = []

        async def again(record: Record) -> Record | None:
            if record.state not in (JobState.FAILED, JobState.CANCELLED):
                return None
            if record.key is not None and await self._take_key(record.key, record.id) != record.id:
                return None  # another job with this key is pending
            new = msgspec.structs.replace(
                record, state=JobState.QUEUED, attempt=0, lost_leases=0, run_at=now,
                finished_at=None, started_at=None, cancel_requested=False, gen=record.gen + 1,
            )  # fmt: skip
            await self._ensure_lane(new.queue, new.priority)
            await self._dispatch([new])
            return new

        for job_id in job_ids:
            _, after = await self._change(job_id, again)
            if after is not None:
                done.append(job_id)
                await self._announce_ready({after.queue})
        return done

    @on_io_loop
    async def cancel(self, job_id: str) -> JobState | None:
        now = await self._fresh_now()

        async def cancel(record: Record) -> Record | None:
            if record.state in (JobState.SCHEDULED, JobState.QUEUED):
                return msgspec.structs.replace(record, state=JobState.CANCELLED, finished_at=now)
            if record.state is JobState.RUNNING and not record.cancel_requested:
                return msgspec.structs.replace(record, cancel_requested=True)
            return None

        before, after = await self._change(job_id, cancel)
        if before is None:
            return None
        record = after or before
        if record.state is JobState.CANCELLED and record.key is not None and after is not None:
            await self._release_key(record.key, record.id)
        return record.state

    @on_io_loop
    async def run_now(self, job_id: str) -> JobState | None:
        now = await self._fresh_now()

        async def due(record: Record) -> Record | None:
            if record.state is not JobState.SCHEDULED:
                return None
            new = msgspec.structs.replace(
                record, state=JobState.QUEUED, run_at=now, gen=record.gen + 1
            )
            await self._ensure_lane(new.queue, new.priority)
            await self._dispatch([new])
            return new

        before, after = await self._change(job_id, due)
        if after is not None:
            await self._announce_ready({after.queue})
        return None if before is None else before.state

    @on_io_loop
    async def purge(self, queue: str) -> int:
        def waiting(r: Record) -> tuple[str, str | None, bool] | None:
            if r.queue != queue or r.state not in (JobState.SCHEDULED, JobState.QUEUED):
                return None
            return r.id, r.key, r.apart

        purged = 0
        apart: list[str] = []
        for revision, (job_id, key, payload_apart) in (await self._judged(waiting)).values():
            if await self._delete("jobs", token(job_id), revision):
                purged += 1
                if payload_apart:
                    apart.append(job_id)
                if key is not None:
                    await self._release_key(key, job_id)
        await self._drop_payloads(apart)
        return purged

    # --- pausing --------------------------------------------------------------------------

    @on_io_loop
    async def pause(self, queue: str, paused: bool) -> None:
        name = f"paused.{token(queue)}"
        if paused:
            await self._put("queues", name, b"1")
        else:
            await self._delete("queues", name)
        self._lanes_at = 0.0  # a lane made just now must be paused too
        names = [n for _, group in await self._lanes_of([queue]) for n in group]
        await asyncio.gather(*(self._pause_consumer(n, paused) for n in names))
        if not paused:
            await self._wake(queue)

    async def _paused_queues(self) -> list[str]:
        found: list[str] = []
        for key in await self._keys("queues", "paused.*"):
            entry = await self._get("queues", key)
            if entry is not None and not entry.deleted:
                found.append(untoken(key.split(".", 1)[1]))
        return found


def _matches(query: JobQuery, record: Record) -> bool:
    return (
        (not query.states or record.state in query.states)
        and (query.queue is None or record.queue == query.queue)
        and (query.task is None or record.task.startswith(query.task))
        and (not query.meta or query.matches(record.job()))
    )


def _prunable(key: str, entry: Entry, finished_before: float) -> tuple[int, bool] | None:
    """(revision, whether its payload is stored apart) of a deleted job's marker, or of a
    finished job's record, older than ``finished_before``; None for any other."""
    if entry.deleted:
        return (entry.revision, False) if entry.stored_at < finished_before else None
    try:
        record = record_decoder.decode(entry.value)
    except msgspec.DecodeError as exc:  # set aside by the claim that meets it
        log.warning("prune leaves out job record %r, unreadable: %r", key, exc)
        return None
    if record.state in FINISHED_STATES and (record.finished_at or 0.0) < finished_before:
        return entry.revision, record.apart
    return None
