"""What a worker owes the broker: outcomes not written yet, and progress reports.

The outbox holds each outcome from the moment its run ends until the broker has it, and keeps
the order rules between outcomes, progress and events:

- **Outcomes ride along with claims.** While the worker is busy, the claim loop claims through
  ``finish_and_claim``, which carries the outcomes waiting: one transaction for both. When the
  worker is idle or stopping, the flush loop writes them (``flush``). A batch that fails to
  be written is put back and goes with the next one; until it is written, heartbeats keep its
  jobs' leases alive (``claims`` covers every outcome not written yet: waiting, riding with a
  claim or being flushed).
- **Progress is coalesced.** Only the latest report of each running job is kept, and the
  first report after a write wakes the flush loop ``interval_s`` later: at most one progress
  write per interval, however often tasks report.
- **A job's last report comes before its outcome.** The report a job left unwritten when it
  ended goes with its outcome and is written first, by whichever call carries the outcome (a
  report written after the outcome would be refused as stale). An outcome also waits for a
  progress write in flight, which may hold a report of its job: progress writes go one at a
  time, in the order they were taken (``ready``).
- **Events follow the writes** (``App(events=True)``): a progress event is emitted when its
  write landed, under the same lock, and an outcome's event when the broker applied it. One
  ``Publisher`` per worker publishes them in the order they were emitted, so a job's events
  leave the worker in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from taskmill.events import Event, ended, outcome_state, progressed, publish
from taskmill.job import Claim, Finish, Job, Outcome, Progress

if TYPE_CHECKING:
    from taskmill.brokers.base import Broker
    from taskmill.worker.execution import JobRun

log = logging.getLogger("taskmill.worker")

PROGRESS_INTERVAL_S = 0.1
"""At most one progress write per this many seconds per worker."""

__all__ = ["PROGRESS_INTERVAL_S", "Batch", "Outbox", "Publisher"]


@dataclass(eq=False, slots=True)
class Batch:
    """Outcomes on their way to the broker, with the last progress reports of their jobs."""

    finishes: list[Finish]
    final: list[tuple[Progress, Job]]
    applied: list[bool] = field(default_factory=list)
    """Once written: whether the broker applied each outcome (False: the lease was stale)."""

    @property
    def stored(self) -> list[Finish]:
        """The outcomes the broker applied."""
        return [f for f, ok in zip(self.finishes, self.applied, strict=True) if ok]


class Outbox:
    """The outcomes and progress reports of one worker's jobs until the broker has them.

    ``wake`` wakes the worker's flush loop; ``later(delay, fn)`` calls ``fn`` on the worker's
    loop ``delay`` seconds from now, from any thread; ``emit`` (events on) takes the events of
    the writes; ``clock`` dates them.
    """

    def __init__(
        self,
        broker: Broker,
        *,
        worker_id: str,
        wake: Callable[[], None],
        later: Callable[[float, Callable[[], None]], None],
        emit: Callable[[Event], None] | None = None,
        clock: Callable[[], float] = time.time,
        interval_s: float = PROGRESS_INTERVAL_S,
        rejected: Callable[[int], None] | None = None,
    ) -> None:
        self._broker = broker
        self._worker_id = worker_id
        self._wake = wake
        self._later = later
        self._emit = emit
        self._clock = clock
        self._interval_s = interval_s
        self._rejected = rejected  # told how many outcomes of a batch the broker refused
        self._pending: list[Finish] = []
        self._final: list[tuple[Progress, Job]] = []  # the last reports of _pending's jobs
        self._in_flight: list[Batch] = []  # riding along with a claim, or being flushed
        self._ending: dict[str, Job] = {}  # events on: the job of each outcome not written
        # task threads report progress: this lock guards _progress, _wake_scheduled and
        # JobRun.ended (no report of a job is taken once its outcome is here)
        self._lock = threading.Lock()
        self._progress: dict[str, tuple[Progress, Job]] = {}
        self._wake_scheduled = False
        self._progress_write = asyncio.Lock()  # progress writes land in the order they were made

    # --- what is owed ---------------------------------------------------------------------------

    @property
    def pending(self) -> bool:
        """Outcomes wait to be written (none is on its way)."""
        return bool(self._pending)

    @property
    def settled(self) -> bool:
        """No outcome waits or is on its way."""
        return not self._pending and not self._in_flight

    @property
    def writing(self) -> bool:
        """Outcomes are on their way (riding along with a claim, or being flushed)."""
        return bool(self._in_flight)

    @property
    def owes(self) -> bool:
        """Outcomes or progress reports wait to be written."""
        return bool(self._pending or self._progress)

    def claims(self) -> list[Claim]:
        """The claims of the outcomes not written yet: their leases must be kept alive."""
        claims = [f.claim for f in self._pending]
        for batch in self._in_flight:
            claims += [f.claim for f in batch.finishes]
        return claims

    # --- progress (any thread) ------------------------------------------------------------------

    def report(self, run: JobRun, fraction: float | None, message: str | None) -> None:
        """A running job's progress report; it replaces the one not written yet."""
        item = (Progress(run.claim, fraction, message), run.job)
        with self._lock:
            if run.ended:
                return
            self._progress[run.job.id] = item
            if self._wake_scheduled:
                return
            self._wake_scheduled = True
        self._later(self._interval_s, self._wake)

    # --- outcomes -------------------------------------------------------------------------------

    def add(self, run: JobRun, outcome: Outcome) -> None:
        """A run's outcome to write, after the last report of its job if one is unwritten."""
        with self._lock:
            run.ended = True
            last = self._progress.pop(run.job.id, None)
        if last is not None:
            self._final.append(last)
        self._pending.append(Finish(run.claim, outcome))
        if self._emit is not None:
            self._ending[run.job.id] = run.job

    def drop(self, run: JobRun) -> None:
        """A run whose lease was lost: nothing of it is written (its last report neither)."""
        with self._lock:
            run.ended = True
            self._progress.pop(run.job.id, None)

    def take(self) -> Batch:
        """Every outcome waiting, as a batch on its way (to carry in a claim). The caller
        makes it ``ready``, writes it, then says how it went: ``landed`` and ``release``, or
        ``put_back``."""
        batch = Batch(self._pending, self._final)
        self._pending, self._final = [], []
        self._in_flight.append(batch)
        return batch

    async def ready(self, batch: Batch) -> None:
        """Write the last reports of the batch's jobs, after any progress write in flight (it
        may hold a report of one of them): then the outcomes may follow."""
        if batch.final or self._progress_write.locked():
            await self._write_progress(batch.final)

    def put_back(self, batch: Batch) -> None:
        """The batch was not written: its outcomes go first in the next one."""
        self._in_flight.remove(batch)
        self._pending[:0] = batch.finishes
        self._final[:0] = batch.final

    def failed(self, batch: Batch, exc: BaseException) -> None:
        """Writing the batch (alone or in a claim) raised ``exc``: ``put_back``, and say so
        if outcomes were in it (not for a cancel: a stopping worker writes them after)."""
        self.put_back(batch)
        if batch.finishes and isinstance(exc, Exception):
            log.error(
                "worker %s: recording %d outcomes failed, will retry (leases are still held): %s",
                self._worker_id,
                len(batch.finishes),
                exc,
            )

    def landed(self, batch: Batch, applied: list[bool]) -> None:
        """The broker took the batch; ``applied`` says which outcomes it applied."""
        batch.applied = applied
        emit = self._emit
        now = self._clock() if emit is not None else 0.0
        refused = 0
        for finish, ok in zip(batch.finishes, applied, strict=True):
            if not ok:
                refused += 1
                log.warning(
                    "job %s: outcome %s rejected: lease token %s is stale (the job was recovered "
                    "and handed to another attempt)",
                    finish.claim.job_id,
                    type(finish.outcome).__name__,
                    finish.claim.token,
                )
            if emit is not None:
                job = self._ending.pop(finish.claim.job_id, None)
                if ok and job is not None:
                    emit(ended(job, outcome_state(finish.outcome, now), now))
        if refused and self._rejected is not None:
            self._rejected(refused)

    def release(self, batch: Batch) -> None:
        """Done with a batch that landed (its leases need no more heartbeats)."""
        self._in_flight.remove(batch)

    async def finish_and_claim(
        self, queues: Sequence[str], limit: int, lease_s: float
    ) -> tuple[Batch, list[Job]]:
        """Claim up to ``limit`` jobs for this worker, carrying every outcome waiting in the
        same broker call (one transaction): the batch written, already released (its
        ``stored`` says which outcomes the broker applied), and the jobs claimed. A claim that
        fails puts the batch back, and the error is raised."""
        batch = self.take()
        try:
            await self.ready(batch)
            applied, jobs = await self._broker.finish_and_claim(
                batch.finishes, queues, limit, self._worker_id, lease_s
            )
        except BaseException as exc:
            self.failed(batch, exc)
            raise
        self.landed(batch, applied)
        self.release(batch)
        return batch, jobs

    # --- the flush loop's writes ----------------------------------------------------------------

    async def flush(self) -> Batch | None:
        """Write the running jobs' progress, then every outcome waiting in one ``finish``:
        the batch written, still on its way (``release`` it when done), or None if no outcome
        waited. A batch that fails is put back, and the error raised."""
        await self.write_progress()
        if not self._pending:
            return None
        batch = self.take()
        try:
            await self.ready(batch)
            applied = await self._broker.finish(batch.finishes)
        except Exception as exc:
            self.failed(batch, exc)
            raise
        self.landed(batch, applied)
        return batch

    async def write_progress(self) -> None:
        """Write the latest report of each running job that reported since the last write."""
        with self._lock:
            items = list(self._progress.values())
            self._progress.clear()
            self._wake_scheduled = False
        if items:
            with contextlib.suppress(Exception):  # logged; a later report replaces it anyway
                await self._write_progress(items)

    async def _write_progress(self, items: list[tuple[Progress, Job]]) -> None:
        """Store progress reports (and emit their events), one write at a time: a job's last
        report must not be overtaken by an earlier one still in flight. With no items: wait
        for the write in flight."""
        async with self._progress_write:
            if not items:
                return
            try:
                await self._broker.record_progress([p for p, _ in items])
            except Exception as exc:
                log.error("worker %s: recording progress failed: %s", self._worker_id, exc)
                raise
            if self._emit is not None:  # under the lock: before the events of outcomes after it
                now = self._clock()
                for p, job in items:
                    self._emit(progressed(job, p.fraction, p.message, now))


class Publisher:
    """A worker's events (``App(events=True)``), published in the order they were emitted.
    Events are at most once: a publish that fails is logged, and its events are dropped."""

    def __init__(self, broker: Broker, *, worker_id: str) -> None:
        self._broker = broker
        self._worker_id = worker_id
        self._events: list[Event] = []
        self._wake = asyncio.Event()

    def emit(self, event: Event) -> None:
        self._events.append(event)
        self._wake.set()

    async def run(self) -> None:
        """Publish events as they come, until cancelled (then ``publish`` the rest)."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.publish()

    async def publish(self) -> None:
        """Publish the events emitted so far, in one call. Cut short by a cancel (a worker's
        stop), they go back first in line for the stop's last ``publish``: a part sent already
        reaches subscribers twice then, which beats losing a job's last event."""
        batch, self._events = self._events, []
        if batch:
            try:
                await publish(self._broker, batch)
            except asyncio.CancelledError:
                self._events[:0] = batch
                raise
            except Exception as exc:  # never stop the worker
                log.error(
                    "worker %s: publishing %d events failed: %s", self._worker_id, len(batch), exc
                )
