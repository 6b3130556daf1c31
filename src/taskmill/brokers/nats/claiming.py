"""How a NATS worker takes jobs: pointers pulled from its queues' lanes, their records
claimed by compare-and-set, and the wait for work (docs/brokers.md, "NATS").

A claim pulls a window of pointers per lane (``dispatch.Lane``), highest priority first,
reads their records, and writes each one it may run as running under a new lease token; the
records it won are acknowledged, the others handed back. A pointer newer than its record is
one still being written; one of a running job whose lease ran out recovers that job. A claim
never waits for work, except for a pointer this process handed back a moment ago: one that
would return nothing looks again when it is due back (``claim``). The claim right after a
hand-over that took a lane's last pending message does not pull that lane (``Lane.emptied``).
A wait sends a long pull per lane only when it can take what arrives (``HandOver``); only a
wait that does not listens for the jobs made ready (``NatsConfig.ready_subject``). Every wait
heeds the wake-ups (a lane made, a queue resumed, the connection back).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Collection, Sequence

import msgspec
from nats.aio.msg import Msg

from taskmill.brokers._io import on_io_loop
from taskmill.brokers._rows import unreadable_record
from taskmill.brokers.base import HandOver
from taskmill.brokers.nats.config import priority_of_token, token
from taskmill.brokers.nats.connection import CasError
from taskmill.brokers.nats.core import CAS_TRIES, GRACE_S
from taskmill.brokers.nats.dispatch import BACK_IN_SIGHT_S, Lane
from taskmill.brokers.nats.records import (
    LeaseEntry,
    Pointer,
    Record,
    pointer_decoder,
    record_decoder,
    record_encoder,
)
from taskmill.brokers.nats.recovery import Recovery
from taskmill.brokers.nats.store import Entry, Session
from taskmill.job import Claim, ErrorInfo, Failed, Finish, Job, JobState

_WRITTEN_MEANWHILE_S = (0.001, 0.004, 0.016)
"""The pauses before each new read of a record whose dispatch's pointer came first."""
_WRITING_S = 0.05
"""How long a pointer whose record is still being written is handed back for."""
_LOOKS_AGAIN = 5
_LOOK_AGAIN_S = 0.005
_LATE_S = 0.1
"""A claim that found nothing while a pointer it handed back is due looks again (up to
``_LOOKS_AGAIN`` times): once it is due back, then after ``_LOOK_AGAIN_S``, twice that,
and so on, while it has been due for less than ``_LATE_S``. A loaded machine delivered one
more than 20 ms late (1 run in 80 of a test, beside three busy loops on 2 CPUs)."""
_PULL_TIMEOUT_S = 5.0
"""How long a claim's pull waits for the server's answer."""

log = logging.getLogger("taskmill.brokers.nats")


class Claiming(Recovery):
    _held: dict[str, dict[str, str]]
    """Worker id -> the jobs it holds (job id -> lease token): its lease entry."""
    _mine: dict[str, tuple[int, Record]]
    """Job id -> (revision, record) this process last wrote for a claim it holds."""
    _back_in_sight: float
    """When the pointers this process handed back for a moment are delivered again."""

    async def _session_opened(self, session: Session) -> None:
        async def woken(msg: Msg) -> None:
            session.wake_version += 1
            session.woken.set()
            if msg.data and msg.data.decode() not in self._known_lanes:
                self._lanes_at = 0.0  # a lane this process has not seen: list them again

        session.wake_sub = await session.nc.subscribe(f"{self.config.prefix}.wake.*", cb=woken)

    async def _listen_for_ready(self, session: Session) -> None:
        """Subscribe ``session`` to the jobs made ready (``NatsConfig.ready_subject``). No
        flush: the server takes the subscription before the claim that follows on the same
        connection, so a job it was not told of is stored before that claim's pull. (A flush
        here would also be cancelled with the wait, and nats-py's reader then fails on the
        cancelled future when the answer comes, stalling the connection.)"""

        async def ready(msg: Msg) -> None:
            session.ready_version += 1
            session.ready.set()

        session.ready_sub = await session.nc.subscribe(f"{self.config.prefix}.ready.*", cb=ready)

    async def _woken_since_claim(self, session: Session, *, listens_for_ready: bool) -> bool:
        """Whether a wake-up (or, ``listens_for_ready``, a job made ready) came since the
        last claim began: the wait returns at once, and the caller claims again."""
        if session.seen_version != session.wake_version:
            session.seen_version = session.wake_version
            return True
        if not listens_for_ready:
            return False
        if session.ready_sub is None:
            await self._listen_for_ready(session)
            return True  # a job made ready before the server had the subscription: claim
        if session.seen_ready != session.ready_version:
            session.seen_ready = session.ready_version
            return True
        return False

    def _reconnected(self, session: Session) -> None:
        """The connection is back: the long pulls sent before may be gone with the server's
        state, so each lane sends a new one, and every wait returns to claim."""
        for lane in session.lanes.values():
            lane.pull_lost()
        session.wake_version += 1
        session.woken.set()

    async def _lane(self, session: Session, name: str) -> Lane:
        lane = session.lanes.get(name)
        if lane is None:
            _qtok, _, ptok = name.rpartition("_")
            lane = Lane(session.nc, self.config.dispatch_stream, name, priority_of_token(ptok))
            await lane.start()
            session.lanes[name] = lane
        return lane

    @on_io_loop
    async def claim(
        self, queues: Sequence[str], limit: int, worker_id: str, lease_s: float
    ) -> list[Job]:
        if limit <= 0:
            return []
        session = await self._session()
        session.seen_version = session.wake_version
        session.seen_ready = session.ready_version
        emptied = {lane for lane in session.lanes.values() if lane.emptied(worker_id)}
        claimed = await self._claim_lanes(session, queues, limit, worker_id, lease_s, emptied)
        # Returning nothing while a pointer handed back a moment ago (its record still being
        # written, or kept too long) is out of sight would let run_until_idle end with its
        # job queued: look again once it is due back, and a few times more while the server
        # may still be delivering it.
        pause = _LOOK_AGAIN_S
        for _ in range(_LOOKS_AGAIN):
            if claimed:
                break
            now = time.monotonic()
            back = self._back_in_sight_of(session)
            if now >= back + _LATE_S:
                break  # due back a while ago: another worker has it, or it is gone
            await asyncio.sleep(max(back - now, pause))
            pause *= 2
            claimed = await self._claim_lanes(session, queues, limit, worker_id, lease_s)
        return claimed

    def _back_in_sight_of(self, session: Session) -> float:
        """When the last pointer this process handed back for a moment is delivered again."""
        back = self._back_in_sight
        for lane in session.lanes.values():
            back = max(back, lane.back_in_sight)
        return back

    async def _claim_lanes(
        self,
        session: Session,
        queues: Sequence[str],
        limit: int,
        worker_id: str,
        lease_s: float,
        skip: Collection[Lane] = (),
    ) -> list[Job]:
        """Claim from ``queues``' lanes, highest priority first, except those in ``skip``."""
        claimed: list[Job] = []
        for _, names in await self._lanes_of(queues):
            lanes = [await self._lane(session, name) for name in names]
            lanes = [lane for lane in lanes if lane not in skip]
            if not lanes:
                continue
            for _ in range(8):  # stale pointers take no slot: pull again, a few times
                need = limit - len(claimed)
                got = await self._pull(lanes, need)
                if not got:
                    break
                claimed += await self._claim_messages(got, worker_id, lease_s)
                if len(claimed) >= limit:
                    return claimed
        return claimed

    async def _pull(self, lanes: list[Lane], need: int) -> list[tuple[Msg, Pointer]]:
        """Up to a window of pointers from lanes of one priority, the first ``need`` in claim
        order (oldest run_at, then enqueue order); the rest are kept for the next claim
        (``Lane.keep``)."""
        window = max(need, 8)
        pulls = await asyncio.gather(*(lane.pull(window, _PULL_TIMEOUT_S) for lane in lanes))
        found: list[tuple[Msg, Pointer, Lane]] = []
        for lane, pulled in zip(lanes, pulls, strict=True):
            for msg in pulled:
                try:
                    found.append((msg, pointer_decoder.decode(msg.data), lane))
                except msgspec.DecodeError:
                    log.error("dropping an unreadable dispatch message on %s", msg.subject)
                    await msg.term()
        found.sort(key=lambda mpl: (mpl[1].run_at, mpl[1].seq))
        for msg, _, lane in found[need:]:
            lane.keep(msg)  # for the next claim; handed back if none comes soon
        return [(msg, pointer) for msg, pointer, _ in found[:need]]

    async def _claim_messages(
        self, got: list[tuple[Msg, Pointer]], worker_id: str, lease_s: float
    ) -> list[Job]:
        """Claim the records of ``got``'s pointers. A claim that lost its CAS to a write
        landing after its read (most often the record of a send whose pointer it met first)
        decides again from a fresh read, a few times, before it hands the pointer back:
        nats-server applies a hand-back after a pull sent just after it, so that pull (this
        claim's next, or the worker's) would not see the job."""
        now = await self._fresh_now()
        round_ = _ClaimRound(worker_id, os.urandom(8).hex(), now, now + lease_s)
        for _ in range(CAS_TRIES):
            got = await self._claim_round(got, round_)
            if not got:
                break
        for msg, _ in got:
            await self._hand_back(msg)  # changed again and again: look at it from scratch
        return await self._with_payloads(round_.won, round_.payloads, round_.token)

    async def _claim_round(
        self, got: list[tuple[Msg, Pointer]], round_: _ClaimRound
    ) -> list[tuple[Msg, Pointer]]:
        """One try of ``_claim_messages``: the pointers whose CAS lost."""
        entries = await self._get_many("jobs", [token(p.id) for _, p in got])
        held = self._held.setdefault(round_.worker_id, {})
        writes: list[tuple[str, bytes, int | None]] = []
        claims: list[tuple[Msg, Pointer, Record]] = []
        for (msg, pointer), entry in zip(got, entries, strict=True):
            record, last = await self._claimable(msg, pointer, entry, round_.now)
            if record is None:
                continue
            running = _running(record, round_.worker_id, round_.token, round_.now, round_.expires)
            writes.append((token(record.id), record_encoder.encode(running), last))
            claims.append((msg, pointer, running))
            held[record.id] = round_.token
        if not claims:
            return []
        # payloads stored apart are read alongside (they never change once written; those of
        # claims that lose are dropped)
        results, _, payloads = await asyncio.gather(
            self._put_many("jobs", writes),
            self._write_lease(round_.worker_id, round_.expires),
            self._payloads([record for _, _, record in claims]),
        )
        round_.payloads.update(payloads)
        lost: list[tuple[Msg, Pointer]] = []
        for (msg, pointer, record), rev in zip(claims, results, strict=True):
            if isinstance(rev, int):
                await msg.ack()
                self._mine[record.id] = (rev, record)
                round_.won.append(record)
            else:
                held.pop(record.id, None)
                lost.append((msg, pointer))
        return lost

    async def _hand_back(self, msg: Msg, delay_s: float = 0.0) -> None:
        """Hand a pointer back to be delivered again in ``delay_s``: a claim that finds
        nothing before then looks again once it is back (``claim``)."""
        self._back_in_sight = max(self._back_in_sight, time.monotonic() + delay_s + BACK_IN_SIGHT_S)
        await msg.nak(delay_s or None)

    async def _with_payloads(
        self, claimed: list[Record], payloads: dict[str, bytes | None], lease_token: str
    ) -> list[Job]:
        """The claimed records as jobs, with their payloads stored apart. A job whose payload
        is missing (removed by hand, or a store damaged) is failed at once, saying so, rather
        than run with no arguments."""
        jobs: list[Job] = []
        missing: list[Record] = []
        for record in claimed:
            payload = payloads.get(record.id)
            if not record.apart:
                jobs.append(record.job())
            elif payload is not None:
                jobs.append(record.job(payload))
            else:
                missing.append(record)
        if missing:
            bucket = self.config.bucket("payloads")
            await self.finish(
                [Finish(Claim(r.id, lease_token), Failed(_no_payload(r, bucket))) for r in missing]
            )
        return jobs

    async def _claimable(
        self, msg: Msg, pointer: Pointer, entry: Entry | None, now: float
    ) -> tuple[Record | None, int | None]:
        """The record a pointer may claim and the revision to CAS on; (None, None) after
        dropping, handing back or recovering the pointer's job."""
        if entry is None:
            if pointer.record is not None and pointer.gen == 0:
                return pointer.record, 0  # its send is still writing it, or died: ours now
            if _age(msg, now) > GRACE_S:
                await msg.term()
            else:
                await self._hand_back(msg, _WRITING_S)
            return None, None
        entry, record = await self._current(msg, pointer, entry, now)
        if record is None:  # deleted, or set aside: unreadable
            await msg.term()
            return None, None
        if record.gen != pointer.gen:
            if record.gen < pointer.gen and _age(msg, now) < GRACE_S:
                await self._hand_back(msg, _WRITING_S)  # its dispatch is writing the record
            else:
                await msg.term()
            return None, None
        if record.state is JobState.QUEUED or (
            record.state is JobState.SCHEDULED and record.run_at <= now + 0.5
        ):
            return record, entry.revision
        if record.state is JobState.SCHEDULED:
            await msg.nak(min(record.run_at - now, 3600.0))
        elif record.state is JobState.RUNNING:
            await self._redelivered_running(msg, record, entry.revision, now)
        else:
            await msg.term()
        return None, None

    async def _current(
        self, msg: Msg, pointer: Pointer, entry: Entry, now: float
    ) -> tuple[Entry, Record | None]:
        """The pointer's record as it stands (None: deleted, or set aside as unreadable),
        waited for a little if the pointer's dispatch is still writing it."""
        record = None if entry.deleted else await self._decoded(pointer, entry, now)
        if record is not None and record.gen < pointer.gen and _age(msg, now) < GRACE_S:
            return await self._written_meanwhile(pointer, entry, record, now)
        return entry, record

    async def _written_meanwhile(
        self, pointer: Pointer, entry: Entry, record: Record | None, now: float
    ) -> tuple[Entry, Record | None]:
        """The record of a dispatch whose pointer came first (a dispatch writes its pointer,
        then its record): read again a few times over about 20 ms before the pointer is
        handed back for 50 ms. Its writer is usually a round trip away, often on this very
        loop (a flush releasing a workflow's next step while this claim runs): handed back
        at once, the step was out of sight for 50 ms (a claim that finds nothing in them
        now waits for it, ``claim``)."""
        for pause in _WRITTEN_MEANWHILE_S:
            await asyncio.sleep(pause)
            fresh = await self._get("jobs", token(pointer.id))
            if fresh is None:
                break
            entry = fresh
            record = None if fresh.deleted else await self._decoded(pointer, fresh, now)
            if record is None or record.gen >= pointer.gen:
                break
        return entry, record

    async def _decoded(self, pointer: Pointer, entry: Entry, now: float) -> Record | None:
        try:
            return record_decoder.decode(entry.value)
        except msgspec.DecodeError as exc:
            await self._set_aside(pointer, entry, now, exc)
            return None

    async def _set_aside(
        self, pointer: Pointer, entry: Entry, now: float, exc: BaseException
    ) -> None:
        """A job's KV record that does not decode (written by another tool, or damaged):
        replace it (CAS on its revision) with a failed record that keeps its bytes as the
        payload and names it in its error, so claims, listings and the recovery scan go on."""
        first = pointer.record
        error = unreadable_record(f"KV record of id {pointer.id!r:.80}", exc)
        record = Record(
            id=pointer.id,
            task=first.task if first is not None else "?",
            queue=first.queue if first is not None else "?",
            state=JobState.FAILED,
            payload=entry.value,
            priority=pointer.priority,
            run_at=pointer.run_at,
            enqueued_at=first.enqueued_at if first is not None else now,
            finished_at=now,
            error=error,
            gen=pointer.gen,
            seq=pointer.seq,
        )
        try:
            await self._put(
                "jobs", token(pointer.id), record_encoder.encode(record), entry.revision
            )
        except CasError:
            return  # changed meanwhile: whoever changed it deals with it
        log.error("%s", error.message)

    async def _redelivered_running(
        self, msg: Msg, record: Record, revision: int, now: float
    ) -> None:
        """A pointer of a running job came back: its claimer died before acknowledging it.
        While the lease runs, look again when it ends; after, recover the job."""
        expires = record.lease_expires_at or 0.0
        if expires > now:
            await msg.nak(min(expires - now + 0.1, 3600.0))
            return
        recovered = await self._recover_record(record, revision, now)
        if recovered is not None:
            self._recovered.append(recovered)
        await msg.term()

    async def _write_lease(self, worker_id: str, expires: float) -> None:
        """Store the worker's lease entry: the jobs it holds. Claims and heartbeats write it
        at once; one whose snapshot went stale while its write was under way writes again,
        so the entry stored last lists every job held."""
        held = self._held.setdefault(worker_id, {})
        for _ in range(CAS_TRIES):
            snapshot = dict(held)
            lease = LeaseEntry(worker_id, expires, snapshot)
            await self._put("leases", token(worker_id), record_encoder.encode(lease))
            if held == snapshot:
                return

    @on_io_loop
    async def wait(
        self, queues: Sequence[str], timeout: float, handover: HandOver | None = None
    ) -> list[Job]:
        session = await self._session()
        lanes = [
            await self._lane(session, name)
            for _, names in await self._lanes_of(queues)
            for name in names
        ]
        # events cleared before looking: what arrives after the look sets them again
        session.woken.clear()
        session.ready.clear()
        for lane in lanes:
            lane.arrived.clear()
        if await self._woken_since_claim(session, listens_for_ready=handover is None):
            return []
        if any(lane.kept for lane in lanes):
            return []  # pulled by a claim and not taken: the next claim takes them
        if any(lane.spare for lane in lanes):
            return await self._take_spare(lanes, handover)
        if handover is not None:
            # Only a wait that takes hand-overs sends long pulls. The other kind is cancelled
            # as soon as one of the worker's own jobs ends (run_until_idle), and a long pull it
            # left on the server would be served before that worker's next claim: a job sent
            # meanwhile would go to the long pull, the claim would find nothing, and
            # run_until_idle would end with the job due. Such a wait learns of new jobs from
            # the wake-up subjects, and of delayed ones when it times out.
            now = time.monotonic()
            for lane in lanes:
                await lane.long_pull(timeout, now)
        waits = [asyncio.ensure_future(session.woken.wait())]
        if handover is None:
            waits.append(asyncio.ensure_future(session.ready.wait()))
        waits += [asyncio.ensure_future(lane.arrived.wait()) for lane in lanes]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if any(lane.spare for lane in lanes):
            return await self._take_spare(lanes, handover)
        return []

    async def _take_spare(self, lanes: list[Lane], handover: HandOver | None) -> list[Job]:
        if handover is None:
            return []  # the next claim takes them
        best = max((lane for lane in lanes if lane.spare), key=lambda lane: lane.priority)
        msg = best.hand_over(handover.worker_id)
        try:
            pointer = pointer_decoder.decode(msg.data)
        except msgspec.DecodeError:
            await msg.term()
            return []
        return await self._claim_messages([(msg, pointer)], handover.worker_id, handover.lease_s)


def _no_payload(record: Record, bucket: str) -> ErrorInfo:
    return ErrorInfo(
        "taskmill.errors.SerializationError",
        f"job {record.id} ({record.task}) has its payload stored apart, and the {bucket} bucket "
        "has none under its id (removed outside taskmill, or a damaged store); failed without "
        "running",
    )


@dataclasses.dataclass
class _ClaimRound:
    """What the tries of one ``_claim_messages`` share: who claims, the lease they write,
    and what they won so far."""

    worker_id: str
    token: str
    now: float
    expires: float
    won: list[Record] = dataclasses.field(default_factory=list)
    payloads: dict[str, bytes | None] = dataclasses.field(default_factory=dict)


def _running(
    record: Record, worker_id: str, lease_token: str, now: float, expires: float
) -> Record:
    return msgspec.structs.replace(
        record,
        state=JobState.RUNNING,
        attempt=record.attempt + 1,
        lease_token=lease_token,
        lease_expires_at=expires,
        worker_id=worker_id,
        started_at=now,
        cancel_requested=False,
    )


def _age(msg: Msg, now: float) -> float:
    """How long ago the server stored a dispatch message."""
    try:
        stamp = msg.metadata.timestamp
    except Exception:
        return 0.0
    return now - stamp.timestamp() if stamp else 0.0
