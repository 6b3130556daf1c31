"""Live events: every state transition and progress report of a job, delivered to subscribers in
any process through the broker (Redis pub/sub, PostgreSQL NOTIFY, SQLite: a polled table,
memory: in-process).

Events are on when the app says so (``App(url, events=True)``, in producers and workers alike):
each costs a publish per batch of transitions, which the fastest paths otherwise skip. The
process that makes a transition publishes it once it is stored: the producer ``queued`` or
``scheduled``, the worker ``running``, progress (coalesced by the worker to at most 10 per
second per job) and the outcome. Delivery is at most once: a subscriber that is not listening
misses what is published meanwhile (for Redis and PostgreSQL; SQLite keeps an hour of events).

Events of one job carry ``seq``, its transition number (0 when enqueued, ``2a - 1`` while
attempt ``a`` runs, ``2a`` after it). Publishers are different processes, so a worker's
``running`` can reach the broker before the producer's ``queued``; ``app.events()`` holds an
event whose predecessor is missing for up to ``hold_s`` (0.2 s) and so yields each job's
events in order.

    >>> import asyncio
    >>> from taskmill import App
    >>> app = App("memory://", events=True)
    >>> @app.task()
    ... def add(a: int, b: int) -> int:
    ...     return a + b
    >>> async def main() -> list[str]:
    ...     handle = await add.asend(1, 2)
    ...     events = handle.awatch()
    ...     first = await anext(events)  # the job's current state; listening from now on
    ...     await app.arun_until_idle()
    ...     return [first.state] + [e.state async for e in events]
    >>> asyncio.run(main())
    ['queued', 'running', 'succeeded']
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from typing import TYPE_CHECKING, Protocol

import msgspec

from taskmill._ids import workflow_of
from taskmill.brokers.features import event_bus
from taskmill.errors import JobNotFoundError
from taskmill.job import (
    FINISHED_STATES,
    Cancelled,
    Failed,
    Job,
    JobState,
    NewJob,
    Outcome,
    RetryAt,
    Succeeded,
)

if TYPE_CHECKING:
    from taskmill.brokers.base import Broker

log = logging.getLogger("taskmill.events")

MAX_PAYLOAD = 7000
"""Bytes per published message (PostgreSQL's NOTIFY takes at most 8000)."""


class Event(msgspec.Struct, frozen=True):
    job_id: str
    task: str
    queue: str
    state: str
    attempt: int
    at: float
    seq: int
    progress: float | None = None
    message: str | None = None

    @property
    def workflow_id(self) -> str | None:
        return workflow_of(self.job_id)

    @property
    def finished(self) -> bool:
        return self.state in _FINISHED


class BrokerSource(Protocol):
    """What hands out its broker, opened on first use: a ``Client`` (or an ``App``)."""

    async def abroker(self) -> Broker: ...


_FINISHED = {s.value for s in FINISHED_STATES}
_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(list[Event])


def enqueued(job: NewJob, now: float) -> Event:
    due = job.run_at if job.run_at is not None else now + job.delay_s
    state = JobState.QUEUED if due <= now else JobState.SCHEDULED
    return Event(job.id, job.task, job.queue, state.value, 0, now, 0)


def started(job: Job, now: float) -> Event:
    return Event(job.id, job.task, job.queue, JobState.RUNNING.value, job.attempt, now,
                 2 * job.attempt - 1)  # fmt: skip


def progressed(job: Job, fraction: float | None, message: str | None, now: float) -> Event:
    seq = 2 * job.attempt - 1
    return Event(job.id, job.task, job.queue, "running", job.attempt, now, seq, fraction, message)


def ended(job: Job, state: JobState, now: float) -> Event:
    return Event(job.id, job.task, job.queue, state.value, job.attempt, now, 2 * job.attempt)


def outcome_state(outcome: Outcome, now: float) -> JobState:
    """The state a stored outcome left its job in."""
    if isinstance(outcome, Succeeded):
        return JobState.SUCCEEDED
    if isinstance(outcome, Failed):
        return JobState.FAILED
    if isinstance(outcome, Cancelled):
        return JobState.CANCELLED
    if isinstance(outcome, RetryAt) and outcome.run_at > now:
        return JobState.SCHEDULED
    return JobState.QUEUED  # a retry due now, or handed back (Released)


def snapshot(job: Job, now: float) -> Event:
    """An event for a job's stored state, numbered as the transition that led to it."""
    seq = 2 * job.attempt - (1 if job.state is JobState.RUNNING else 0)
    return Event(job.id, job.task, job.queue, job.state.value, job.attempt, now, seq,
                 job.progress, job.progress_message)  # fmt: skip


RECHECK_S = 1.0
"""How often a watch reads its job again, in case the finishing event was lost."""


async def watch(
    source: BrokerSource, job_id: str, recheck_s: float = RECHECK_S
) -> AsyncGenerator[Event, None]:
    """One job's events until it finishes, starting with its current state (read once the
    subscription listens, so nothing between the two is missed).

    Events are delivered at most once, so the job is also read again every ``recheck_s``:
    once the record says it finished, the watch ends with the event it would have ended on
    (``ended``: the final state, its attempt and ``seq``), whether or not that came."""
    ready = asyncio.Event()
    stream = subscribe(source, job_id=job_id, ready=ready)
    pending = asyncio.ensure_future(stream.__anext__())
    try:
        listening = asyncio.ensure_future(ready.wait())
        await asyncio.wait({pending, listening}, return_when=asyncio.FIRST_COMPLETED)
        listening.cancel()
        if pending.done() and pending.exception() is not None:
            raise pending.exception()  # type: ignore[misc]
        broker = await source.abroker()
        job = await _read(broker, job_id)
        first = snapshot(job, time.time())
        yield first
        if job.state.finished:
            return
        recheck_at = time.monotonic() + recheck_s
        while True:
            wait_s = max(0.0, recheck_at - time.monotonic())
            done, _ = await asyncio.wait({pending}, timeout=wait_s)
            if not done:
                job = await _read(broker, job_id)
                if job.state.finished:  # its finishing event was lost, or is late
                    yield ended(job, job.state, time.time())
                    return
                recheck_at = time.monotonic() + recheck_s
                continue
            event = pending.result()
            pending = asyncio.ensure_future(stream.__anext__())
            repeat = event.seq == first.seq and event.state == first.state
            if event.seq < first.seq or (repeat and event.progress is None and not event.message):
                continue  # the snapshot told it already
            yield event
            if event.finished:
                return
    finally:
        pending.cancel()
        with contextlib.suppress(BaseException):
            await pending
        await stream.aclose()


async def _read(broker: Broker, job_id: str) -> Job:
    job = await broker.get(job_id)
    if job is None:
        raise JobNotFoundError(f"job {job_id} does not exist (or was pruned)")
    return job


def payloads(events: Sequence[Event]) -> list[bytes]:
    """Events as JSON arrays of at most ``MAX_PAYLOAD`` bytes each."""
    out: list[bytes] = []
    batch: list[Event] = []
    size = 2
    for event in events:
        length = len(_encoder.encode(event)) + 1
        if batch and size + length > MAX_PAYLOAD:
            out.append(_encoder.encode(batch))
            batch, size = [], 2
        batch.append(event)
        size += length
    if batch:
        out.append(_encoder.encode(batch))
    return out


async def publish(broker: Broker, events: Sequence[Event]) -> None:
    """Deliver events to every subscription listening now, in as few payloads as fit."""
    bus = event_bus(broker)
    for payload in payloads(events):
        await bus.publish_events(payload)


def decode_payload(payload: bytes) -> list[Event]:
    try:
        return _decoder.decode(payload)
    except msgspec.DecodeError:
        return []  # not ours, or from a newer version: skip rather than end the stream


class _Reorder:
    """Per job, events in ``seq`` order: one whose predecessor has not arrived waits for it
    up to ``hold_s``, then goes anyway (the predecessor was lost, or came before we listened).

    A subscription can live for weeks (a dashboard's stream), so the jobs it remembers are
    bounded: of jobs that ended, the latest ``keep_ended`` are remembered. An event of one
    forgotten after that (a manual retry long after) waits ``hold_s`` like one whose
    predecessor was lost."""

    def __init__(self, hold_s: float, keep_ended: int = 10_000) -> None:
        self.hold_s = hold_s
        self.keep_ended = keep_ended
        self.last: dict[str, int] = {}
        self.held: dict[str, list[tuple[float, Event]]] = {}
        self.ended: OrderedDict[str, None] = OrderedDict()

    def push(self, event: Event, now: float) -> list[Event]:
        last = self.last.get(event.job_id)
        if (last is None and event.seq == 0) or (last is not None and event.seq <= last + 1):
            return self._forget_ended(self._release(event))
        self.held.setdefault(event.job_id, []).append((now + self.hold_s, event))
        return []

    def _forget_ended(self, released: list[Event]) -> list[Event]:
        for event in released:
            if event.finished:
                self.ended[event.job_id] = None
                self.ended.move_to_end(event.job_id)
        while len(self.ended) > self.keep_ended:
            job_id, _ = self.ended.popitem(last=False)
            if job_id not in self.held:
                self.last.pop(job_id, None)
        return released

    def _release(self, event: Event) -> list[Event]:
        out = [event]
        self.last[event.job_id] = max(event.seq, self.last.get(event.job_id, event.seq))
        held = self.held.get(event.job_id)
        while held:
            held.sort(key=lambda item: item[1].seq)
            nxt = held[0][1]
            if nxt.seq > self.last[event.job_id] + 1:
                break
            held.pop(0)
            out.append(nxt)
            self.last[event.job_id] = max(nxt.seq, self.last[event.job_id])
        if not held:
            self.held.pop(event.job_id, None)
        return out

    def expired(self, now: float) -> list[Event]:
        out: list[Event] = []
        for job_id in list(self.held):
            held = self.held[job_id]
            if min(deadline for deadline, _ in held) <= now:
                held.sort(key=lambda item: item[1].seq)
                first = held.pop(0)[1]
                if not held:
                    self.held.pop(job_id)
                self.last.pop(job_id, None)
                self.last[job_id] = first.seq
                out.append(first)
                out.extend(self._release_after(job_id))
        return self._forget_ended(out)

    def _release_after(self, job_id: str) -> list[Event]:
        held = self.held.get(job_id)
        if not held:
            return []
        held.sort(key=lambda item: item[1].seq)
        nxt = held[0][1]
        if nxt.seq > self.last[job_id] + 1:
            return []
        held.pop(0)
        if not held:
            self.held.pop(job_id)
        return self._release(nxt)

    def next_deadline(self) -> float | None:
        deadlines = [d for held in self.held.values() for d, _ in held]
        return min(deadlines) if deadlines else None


def _matches(
    event: Event, job_ids: set[str] | None, workflow_id: str | None, queue: str | None
) -> bool:
    if job_ids is not None and event.job_id not in job_ids:
        return False
    if workflow_id is not None and event.workflow_id != workflow_id:
        return False
    return queue is None or event.queue == queue


async def subscribe(
    source: BrokerSource,
    *,
    job_id: str | Iterable[str] | None = None,
    workflow_id: str | None = None,
    queue: str | None = None,
    hold_s: float = 0.2,
    ready: asyncio.Event | None = None,
) -> AsyncGenerator[Event, None]:
    """Events from every process, filtered, each job's in order (see the module's docstring).
    ``ready`` is set once the subscription listens (what was published before is not seen)."""
    job_ids = {job_id} if isinstance(job_id, str) else set(job_id) if job_id is not None else None
    bus = event_bus(await source.abroker())
    reorder = _Reorder(hold_s)
    async with bus.events_subscription() as subscription:
        if ready is not None:
            ready.set()
        pending: asyncio.Future[bytes] | None = None
        try:
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(subscription.get())
                deadline = reorder.next_deadline()
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                done, _ = await asyncio.wait({pending}, timeout=timeout)
                out: list[Event] = []
                if pending in done:
                    payload = pending.result()
                    pending = None
                    now = time.monotonic()
                    for event in decode_payload(payload):
                        if _matches(event, job_ids, workflow_id, queue):
                            out.extend(reorder.push(event, now))
                out.extend(reorder.expired(time.monotonic()))
                for event in out:
                    yield event
        finally:
            if pending is not None:
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending


_CLOSE_WAIT_S = 2.0
"""How long the last result wait waits for the subscription to close (a broker gone away
must not hold up a result already read); past that the close goes on in the background."""


class FinishWatch:
    """Wakes waits for jobs to finish (``JobHandle.result()`` with events on) from one events
    subscription shared by every wait on one event loop: a wait costs no polling, and however
    many run at once there is one subscription (on PostgreSQL, one connection). It listens
    while a wait is in progress; the last wait to end closes the subscription before it
    returns (its loop may end right after).

    Events are delivered at most once, so a wait still reads the job again now and then
    (``Client.await_finished``): a lost event, or a worker with events off, delays the wait,
    it never hangs it.
    """

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._task: asyncio.Task[None] | None = None
        self._listening: asyncio.Future[None] | None = None

    @contextlib.asynccontextmanager
    async def watching(self, job_id: str) -> AsyncIterator[asyncio.Event]:
        """An ``asyncio.Event`` set when an event says the job finished (or the subscription
        broke: the waiter should read the job again). Listening once the block begins."""
        finished = asyncio.Event()
        self._waiters.setdefault(job_id, set()).add(finished)
        try:
            await self._listen()
            yield finished
        finally:
            waiters = self._waiters.get(job_id)
            if waiters is not None:
                waiters.discard(finished)
                if not waiters:
                    del self._waiters[job_id]
            if not self._waiters and self._task is not None:
                task, self._task = self._task, None
                task.cancel()
                # its subscription closed before the wait returns: the caller's loop may end
                # right after (asyncio.run's), cancelling that close half-way and leaving a
                # connection open on a closed loop
                await asyncio.wait({task}, timeout=_CLOSE_WAIT_S)  # a cancel still goes through

    async def _listen(self) -> None:
        """Return once the subscription listens (or failed to start: then the waits poll)."""
        if self._task is None or self._task.done():
            self._listening = asyncio.get_running_loop().create_future()
            self._task = asyncio.create_task(self._run(self._listening), name="taskmill-finishes")
        assert self._listening is not None
        await asyncio.shield(self._listening)

    async def _run(self, listening: asyncio.Future[None]) -> None:
        subscription = event_bus(self._broker).events_subscription()
        try:
            try:
                await subscription.start()
            finally:  # listening, or failed to start: either way the waits go on
                if not listening.done():
                    listening.set_result(None)
            while True:
                for event in decode_payload(await subscription.get()):
                    if event.state in _FINISHED:
                        for waiter in self._waiters.get(event.job_id, ()):
                            waiter.set()
        except Exception as exc:
            log.error("listening for finished jobs failed (waits poll instead): %s", exc)
        finally:
            with contextlib.suppress(Exception):
                await subscription.close()
            for waiters in self._waiters.values():  # they read their job again
                for waiter in waiters:
                    waiter.set()
