"""Periodic schedules, workflows, flow control and live events on NATS.

Schedule marks, rate limits and concurrency slots are small values in the ``misc`` bucket,
each changed by compare-and-set; workflows have a bucket of their own; live events go over
core NATS subjects (at most once, to whoever listens, as the contract asks), never stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Mapping
from typing import TypeVar

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

from taskmill.brokers._io import on_io_loop
from taskmill.brokers.base import Broker
from taskmill.brokers.features import (
    EventBus,
    LimitStore,
    ScheduleStore,
    Subscription,
    WorkflowRecord,
    WorkflowStore,
)
from taskmill.brokers.nats.config import NatsConfig, token
from taskmill.brokers.nats.connection import CasError, connect
from taskmill.brokers.nats.core import Core
from taskmill.brokers.nats.records import record_decoder
from taskmill.brokers.nats.store import Entry
from taskmill.errors import BrokerUnavailableError
from taskmill.job import JobState

T = TypeVar("T")


class _Workflow(msgspec.Struct, array_like=True):
    spec: bytes
    state: str
    created_at: float
    finished_at: float | None = None


_workflow_decoder = msgspec.msgpack.Decoder(_Workflow)
_slots_decoder = msgspec.msgpack.Decoder(dict[str, float])
_encoder = msgspec.msgpack.Encoder()


class Features(Core, Broker, ScheduleStore, WorkflowStore, LimitStore, EventBus):
    async def _cas_loop(
        self, what: str, key: str, change: Callable[[Entry | None], tuple[bytes | None, T]]
    ) -> T:
        """Read ``key``, write what ``change`` makes of it (None: nothing) by compare-and-set,
        again from a fresh read when the CAS lost; the second value ``change`` returned.

        Callers in one process take turns on a key (a lock per key and loop), so only other
        processes contend: 16 jobs of one worker reserving one rate limit's slots would
        otherwise lose most of their CASes to each other. A lost CAS waits a random moment."""
        lock = self._cas_locks.setdefault((asyncio.get_running_loop(), what, key), asyncio.Lock())
        deadline = time.monotonic() + self.config.unavailable_after_s
        async with lock:
            while True:
                entry = await self._get(what, key)
                current = None if entry is None or entry.deleted else entry
                value, answer = change(current)
                if value is None:
                    return answer
                last = 0 if entry is None else entry.revision
                try:
                    await self._put(what, key, value, last)
                except CasError:
                    if time.monotonic() > deadline:
                        break
                    await asyncio.sleep(random.uniform(0, 0.005))
                    continue
                return answer
        raise BrokerUnavailableError(
            f"NATS: {what}/{key} kept changing under a compare-and-set for "
            f"{self.config.unavailable_after_s:g} s"
        )

    # --- schedules ------------------------------------------------------------------------

    @on_io_loop
    async def schedule_marks(self) -> dict[str, float]:
        marks: dict[str, float] = {}
        async for key, entry in self._scan("misc"):
            if key.startswith("mark.") and not entry.deleted:
                from taskmill.brokers.nats.config import untoken

                marks[untoken(key[5:])] = float(entry.value)
        return marks

    @on_io_loop
    async def mark_schedules(self, marks: Mapping[str, float]) -> None:
        for name, tick in marks.items():

            def later(entry: Entry | None, tick: float = tick) -> tuple[bytes | None, None]:
                if entry is not None and float(entry.value) >= tick:
                    return None, None
                return repr(tick).encode(), None

            await self._cas_loop("misc", f"mark.{token(name)}", later)

    # --- workflows ------------------------------------------------------------------------

    @on_io_loop
    async def save_workflow(self, workflow_id: str, spec: bytes) -> None:
        record = _Workflow(spec, "running", await self._fresh_now())
        with contextlib.suppress(CasError):  # stored already: it keeps what it has
            await self._put("workflows", token(workflow_id), _encoder.encode(record), 0)

    @on_io_loop
    async def get_workflow(self, workflow_id: str) -> WorkflowRecord | None:
        entry = await self._get("workflows", token(workflow_id))
        if entry is None or entry.deleted:
            return None
        w = _workflow_decoder.decode(entry.value)
        return WorkflowRecord(workflow_id, w.spec, w.state, w.created_at, w.finished_at)

    @on_io_loop
    async def end_workflow(self, workflow_id: str, state: str) -> bool:
        now = await self._fresh_now()

        def end(entry: Entry | None) -> tuple[bytes | None, bool]:
            if entry is None:
                return None, False
            w = _workflow_decoder.decode(entry.value)
            if w.state != "running":
                return None, False
            return _encoder.encode(_Workflow(w.spec, state, w.created_at, now)), True

        return await self._cas_loop("workflows", token(workflow_id), end)

    @on_io_loop
    async def reopen_workflow(self, workflow_id: str) -> bool:
        def reopen(entry: Entry | None) -> tuple[bytes | None, bool]:
            if entry is None:
                return None, False
            w = _workflow_decoder.decode(entry.value)
            if w.state != "failed":
                return None, False
            return _encoder.encode(_Workflow(w.spec, "running", w.created_at)), True

        return await self._cas_loop("workflows", token(workflow_id), reopen)

    @on_io_loop
    async def running_workflows(self, limit: int = 1000) -> list[str]:
        from taskmill.brokers.nats.config import untoken

        running: list[tuple[float, str]] = []
        async for key, entry in self._scan("workflows"):
            if entry.deleted:
                continue
            w = _workflow_decoder.decode(entry.value)
            if w.state == "running":
                running.append((w.created_at, untoken(key)))
        return [workflow_id for _, workflow_id in sorted(running)[:limit]]

    async def _prune_workflows(self, finished_before: float) -> None:
        def ended(_: str, entry: Entry) -> int | None:
            if entry.deleted:
                return None
            w = _workflow_decoder.decode(entry.value)
            if w.finished_at is not None and w.finished_at < finished_before:
                return entry.revision
            return None

        found = await self._scan_kept("workflows", ended, stored_before=finished_before)
        await self._erase("workflows", list(found.values()))

    # --- flow control ---------------------------------------------------------------------

    @on_io_loop
    async def reserve_rate_slot(self, bucket: str, interval_s: float) -> float:
        await self._fresh_now()

        def reserve(entry: Entry | None) -> tuple[bytes | None, float]:
            # the time of this try, not of the call: tries wait for this process's CAS lock,
            # and a delay counted from before that wait would start the job late
            now = self._now()
            start = max(float(entry.value) if entry is not None else now, now)
            return repr(start + interval_s).encode(), start - now

        return await self._cas_loop("misc", f"rate.{token(bucket)}", reserve)

    @on_io_loop
    async def acquire_slot(self, bucket: str, holder: str, limit: int, ttl_s: float) -> bool:
        now = await self._fresh_now()

        def acquire(entry: Entry | None) -> tuple[bytes | None, bool]:
            holders = {} if entry is None else _slots_decoder.decode(entry.value)
            holders = {h: until for h, until in holders.items() if until > now}
            if holder not in holders and len(holders) >= limit:
                return None, False
            holders[holder] = now + ttl_s
            return _encoder.encode(holders), True

        return await self._cas_loop("misc", f"slots.{token(bucket)}", acquire)

    @on_io_loop
    async def release_slot(self, bucket: str, holder: str) -> None:
        def release(entry: Entry | None) -> tuple[bytes | None, None]:
            holders = {} if entry is None else _slots_decoder.decode(entry.value)
            if holder not in holders:
                return None, None
            del holders[holder]
            return _encoder.encode(holders), None

        await self._cas_loop("misc", f"slots.{token(bucket)}", release)

    @on_io_loop
    async def queue_depth(self, queue: str) -> int:
        waiting = (JobState.SCHEDULED, JobState.QUEUED)

        def counted(key: str, entry: Entry) -> bool | None:
            record = None
            if not entry.deleted:
                with contextlib.suppress(msgspec.DecodeError):  # unreadable: not waiting
                    record = record_decoder.decode(entry.value)
            if record is not None and record.queue == queue and record.state in waiting:
                return True
            return None

        return len(await self._scan_kept("jobs", counted))

    # --- live events ----------------------------------------------------------------------

    @on_io_loop
    async def publish_events(self, payload: bytes) -> None:
        session = await self._session()
        await session.nc.publish(self.config.events_subject, payload)

    def events_subscription(self) -> Subscription:
        return _NatsSubscription(self.config)


class _NatsSubscription(Subscription):
    """A connection of its own on the subscriber's loop (the broker's may be on another)."""

    def __init__(self, config: NatsConfig) -> None:
        self._config = config
        self._queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._nc: Client | None = None

    async def start(self) -> None:
        self._nc = await connect(self._config, name=f"taskmill {self._config.prefix} events")

        async def got(msg: Msg) -> None:
            self._queue.put_nowait(msg.data)

        await self._nc.subscribe(self._config.events_subject, cb=got)
        await self._nc.flush(timeout=max(1, int(self._config.unavailable_after_s)))

    async def get(self) -> bytes:
        return await self._queue.get()

    async def close(self) -> None:
        if self._nc is not None:
            nc, self._nc = self._nc, None
            with contextlib.suppress(Exception):
                await nc.close()
