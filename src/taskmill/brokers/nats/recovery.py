"""Recovery on NATS: jobs whose worker stopped renewing its lease, jobs whose lease ran out
unseen, pointers lost with a server, and delayed jobs that came due without the server's
scheduled messages. All of it runs in ``recover``, which every worker calls every
``recover_interval_s``; the full reads (``_sweep``) at most once per ``SWEEP_S``."""

from __future__ import annotations

import json
import logging
import time

import msgspec

from taskmill.brokers._io import on_io_loop
from taskmill.brokers._rows import recovered_error
from taskmill.brokers.nats.admin import Admin
from taskmill.brokers.nats.config import token
from taskmill.brokers.nats.connection import CasError, ack_seq
from taskmill.brokers.nats.core import LANE_HEADER
from taskmill.brokers.nats.records import (
    LeaseEntry,
    Record,
    pointer_decoder,
    record_decoder,
    record_encoder,
)
from taskmill.brokers.nats.store import SCAN_BATCH, Entry
from taskmill.job import JobState

SWEEP_S = 30.0
"""How often ``recover`` also reads every record (``_sweep``)."""
_WAITING = (JobState.SCHEDULED, JobState.QUEUED)
log = logging.getLogger("taskmill.brokers.nats")


class Recovery(Admin):
    max_lost_leases: int
    _recovered: list[tuple[str, JobState]]
    """Recovered by a claim that found a running job's pointer redelivered: told by the next
    ``recover``."""
    _sweep_at: float

    @on_io_loop
    async def recover(self, max_lost_leases: int) -> list[tuple[str, JobState]]:
        self.max_lost_leases = max_lost_leases
        recovered, self._recovered = self._recovered, []
        now = await self._fresh_now()
        if time.monotonic() >= self._sweep_at:
            self._sweep_at = time.monotonic() + SWEEP_S
            recovered += await self._sweep(now)
        if not self.schedules_on_server:
            await self._promote_due(now)
        for name in await self._keys("leases"):
            recovered += await self._recover_lease(name, now)
        return recovered

    async def _recover_lease(self, name: str, now: float) -> list[tuple[str, JobState]]:
        """The jobs of one worker's lease entry, if it ran out: each still held by that
        claim, with its own lease run out, is recovered; the entry goes once none it names
        is still held on a lease that runs on.

        A job's own lease may outlast the entry's: a claim's write of the entry, its expiry
        taken before a heartbeat extended the jobs, can land after the heartbeat's. Such an
        entry is kept for the next ``recover``; deleted, it left those jobs of a killed
        worker to the sweep, up to ``SWEEP_S`` later."""
        entry = await self._get("leases", name)
        if entry is None or entry.deleted:
            return []
        lease = msgspec.msgpack.decode(entry.value, type=LeaseEntry)
        if lease.expires_at >= now:
            return []
        recovered: list[tuple[str, JobState]] = []
        running_on = False
        for job_id, lease_token in lease.claims.items():
            found = await self._get("jobs", token(job_id))
            if found is None or found.deleted:
                continue
            record = record_decoder.decode(found.value)
            if record.state is not JobState.RUNNING or record.lease_token != lease_token:
                continue
            if (record.lease_expires_at or 0.0) >= now:
                running_on = True
                continue
            done = await self._recover_record(record, found.revision, now)
            if done is not None:
                recovered.append(done)
        if not running_on:
            await self._delete("leases", name, entry.revision)
        return recovered

    async def _promote_due(self, now: float) -> int:
        """The workers' promoter (servers without scheduled messages, or
        ``schedules=workers``): pointers of delayed jobs wait in a subject per minute of their
        run_at; those due now move to their lane. Promoters racing each other are safe: the
        moved pointer's message id is deduplicated, and a pointer is a pointer (the record's
        CAS decides who runs it). How many queues were woken."""
        stream = self.config.dispatch_stream
        prefix = self.config.delayed_subject(0)[:-1]
        current = int(now // 60)
        minutes = sorted(
            int(s[len(prefix) :])
            for s in await self._subjects(stream, prefix + "*")
            if s[len(prefix) :].isdigit()
        )
        woken: set[str] = set()
        session = await self._session()
        for minute in (m for m in minutes if m <= current):
            subject, seq = self.config.delayed_subject(minute), 0
            while (found := await self._next_message(stream, subject, seq)) is not None:
                seq, msg = found
                pointer = pointer_decoder.decode(msg.data)
                seq += 1
                if pointer.run_at > now:
                    continue
                lane = (msg.headers or {}).get(LANE_HEADER, "")
                if lane.startswith(f"{self.config.prefix}.d."):
                    headers = {"Nats-Msg-Id": f"{pointer.id}:{pointer.gen}:due"}
                    ack_seq(await session.requests.request(lane, msg.data, headers))
                    woken.add(lane.split(".")[2])
                await self._erase_dispatch(seq - 1)
        for qtok in woken:  # the lane's token as it is: a header need not decode
            await session.nc.publish(f"{self.config.prefix}.ready.{qtok}", b"")
        return len(woken)

    async def _erase_dispatch(self, seq: int) -> None:
        session = await self._session()
        await session.requests.request(
            f"$JS.API.STREAM.MSG.DELETE.{self.config.dispatch_stream}",
            json.dumps({"seq": seq, "no_erase": True}).encode(),
        )

    async def _sweep(self, now: float) -> list[tuple[str, JobState]]:
        """Read every record, for two things nothing else would find.

        A running job whose lease ran out though no lease entry names it (a claim whose
        reply was lost: its worker never learnt it held the job) is recovered. A waiting
        job last written 30 to 60 s ago gets its pointer sent again: stored already, that
        pointer is dropped as a duplicate (the stream's window is 2 minutes); lost with a
        server that crashed between a send's two writes, it is stored now. Sweeps come
        every ``SWEEP_S``, so each waiting record is looked at once.

        The records are judged as they arrive and only those to act on are kept, so a
        sweep's memory follows the jobs it acts on, not the jobs stored (finished ones stay
        for ``result_ttl_s``: a million of them held at once was ~1 GiB, T20); of a waiting
        job, without its payload (a backlog can be every job stored).

        It also finds payloads stored apart that no record names (``_drop_orphan_payloads``):
        the payloads bucket's keys, listed before the scan (a payload is written before its
        record), less those of the records the scan meets."""
        orphans = set(await self._keys("payloads"))
        found = await self._sweep_candidates(now, orphans)
        recovered: list[tuple[str, JobState]] = []
        again: list[Record] = []
        for entry, record in found.values():
            if record.state is JobState.RUNNING:
                done = await self._recover_record(record, entry.revision, now)
                if done is not None:
                    recovered.append(done)
            else:
                again.append(record)
        for start in range(0, len(again), SCAN_BATCH):  # a bounded burst of sends at a time
            await self._dispatch(again[start : start + SCAN_BATCH])
        await self._drop_orphan_payloads(orphans)
        return recovered

    async def _sweep_candidates(
        self, now: float, orphans: set[str] | None = None
    ) -> dict[str, tuple[Entry, Record]]:
        """The records a sweep acts on, by key. A scan delivers a key again when it is written
        while the scan runs (later in the stream, so newer): its latest revision decides.
        The key of each record met is taken out of ``orphans``."""

        def candidate(key: str, entry: Entry) -> tuple[Entry, Record] | None:
            if orphans is not None and not entry.deleted:
                orphans.discard(key)
            record = None
            if not entry.deleted:
                try:
                    record = record_decoder.decode(entry.value)
                except msgspec.DecodeError as exc:  # set aside by the claim that meets it
                    log.warning("a sweep leaves out job record %r, unreadable: %r", key, exc)
            if record is None or not _to_sweep(record, entry.stored_at, now):
                return None
            if record.state is not JobState.RUNNING:
                # only its pointer is sent again, which does not carry the payload: a
                # backlog of waiting jobs kept whole made the sweep hold them all (608
                # MiB in T9 at full size, 2,500 of the records 200-260 KB)
                record = msgspec.structs.replace(record, payload=b"")
                entry = Entry(entry.revision, b"", entry.deleted, entry.stored_at)
            return entry, record

        return await self._scan_kept("jobs", candidate)

    async def _recover_record(
        self, record: Record, revision: int, now: float
    ) -> tuple[str, JobState] | None:
        lost = record.lost_leases + 1
        new = msgspec.structs.replace(
            record,
            lost_leases=lost,
            error=recovered_error(record.attempt, record.worker_id, lost),
            lease_token=None,
            lease_expires_at=None,
            worker_id=None,
        )
        if record.cancel_requested:
            new.state, new.finished_at = JobState.CANCELLED, now
        elif lost >= self.max_lost_leases:
            new.state, new.finished_at = JobState.FAILED, now
        else:
            new.state, new.gen = JobState.QUEUED, record.gen + 1
            # to the redo lane: it keeps its place before the jobs sent since
            await self._ensure_lane(new.queue, new.priority, redo=True)
            await self._dispatch([new], redo=True)
        try:
            await self._put("jobs", token(record.id), record_encoder.encode(new), revision)
        except CasError:
            return None
        if new.state.finished and new.key is not None:
            await self._release_key(new.key, new.id)
        if new.state is JobState.QUEUED:
            await self._announce_ready({new.queue})
        return new.id, new.state


def _to_sweep(record: Record, stored_at: float, now: float) -> bool:
    """A running job whose lease ran out, or a waiting one last written 30 to 60 s ago."""
    if record.state is JobState.RUNNING:
        return (record.lease_expires_at or 0.0) < now
    return record.state in _WAITING and now - 2 * SWEEP_S < stored_at <= now - SWEEP_S
