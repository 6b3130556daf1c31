"""The scheduler: enqueues each periodic schedule's ticks as jobs, once each, from any number of
processes at once.

Each pass reads the time from the broker (so schedulers on skewed clocks agree and none runs a
tick early), reads each schedule's mark (the latest tick enqueued), asks the ``Schedule`` which
ticks are due, and enqueues them. A tick's job id names the schedule and the tick
(``schedule:NAME:2026-01-01T02:00:00+00:00``), and a broker never stores an id twice, even
after that job finished: two schedulers that see the same tick store one job. Then the marks
move forward (never back). A scheduler that dies between the two steps leaves the mark
behind; the next pass enqueues the same ids again, which stores nothing.

``overlap="skip"`` gives a tick's job the unique key ``schedule:NAME``: while the previous run
is scheduled, queued or running, the new tick stores nothing and is counted as skipped.

Ticks go through the client's enqueue pipeline like sends (``taskmill.client``): a ``queued``
event at once (with events on) and the ``on_enqueue`` hooks, in the scheduler's process. A
queue's ``max_depth`` applies too, without waiting: the ticks of a full queue are refused
(counted in ``PassReport.refused``, logged), their schedules' marks stay, and the next pass
tries them again, while the ticks of other queues are stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from taskmill.brokers.features import schedule_store
from taskmill.errors import QueueFullError
from taskmill.job import JobState, NewJob
from taskmill.schedules import Schedule

if TYPE_CHECKING:
    from taskmill.client import AppParts, Client
    from taskmill.registry import Registry, TaskDefinition

log = logging.getLogger("taskmill.scheduler")

MAX_SLEEP_S = 30.0
"""The longest a scheduler sleeps between passes, so a schedule's mark moved by another
scheduler or a clock step is seen within that long."""


@dataclass(frozen=True, slots=True)
class PassReport:
    """What one pass did: the jobs stored, the ticks another scheduler had stored already,
    the ticks skipped because the previous run was still pending (``overlap="skip"``), and
    the ticks refused because their queue was full (``max_depth``; tried again next pass)."""

    enqueued: list[str]
    existing: list[str]
    skipped: list[str]
    refused: list[str] = field(default_factory=list)


def tick_job_id(schedule: Schedule, tick: datetime) -> str:
    return schedule.key(tick)


def overlap_key(schedule: Schedule) -> str:
    return f"schedule:{schedule.name}"


class Scheduler:
    """Runs the schedules of ``app`` (an ``App``, or anything with its ``registry`` and
    ``client``). ``clock`` returns the time in Unix seconds (default: the broker's clock);
    ``sleep(seconds, stop)`` returns after that long or once ``stop`` is set (default: on the
    event loop's clock). Tests inject both, to run minutes of ticks in a moment."""

    def __init__(
        self,
        app: AppParts,
        *,
        clock: Callable[[], Awaitable[float]] | None = None,
        sleep: Callable[[float, asyncio.Event], Awaitable[None]] | None = None,
    ) -> None:
        self.registry: Registry = app.registry
        self.client: Client = app.client
        self._clock = clock
        self._sleep = sleep or _sleep_unless_stopped

    async def _now(self) -> float:
        if self._clock is not None:
            return await self._clock()
        return await (await self.client.abroker()).now()

    def _job(self, schedule: Schedule, tick: datetime) -> NewJob:
        """The job of one tick."""
        return self._tick_job(self.registry.get_task(schedule.task), schedule, tick)

    def _tick_job(self, task: TaskDefinition, schedule: Schedule, tick: datetime) -> NewJob:
        opts = replace(
            task.defaults,
            job_id=tick_job_id(schedule, tick),
            key=overlap_key(schedule) if schedule.overlap == "skip" else None,
            on_conflict="return",
            meta=dict(schedule.meta),
        )
        return task.build(opts, tuple(schedule.args), dict(schedule.kwargs))

    async def run_pass(self, schedules: Sequence[Schedule] | None = None) -> PassReport:
        """Enqueue every tick due now; what it did."""
        schedules = list(self.registry.schedules.values()) if schedules is None else list(schedules)
        report = PassReport([], [], [])
        if not schedules:
            return report
        broker = await self.client.abroker()
        now = datetime.fromtimestamp(await self._now(), UTC)
        store = schedule_store(broker)
        marks = await store.schedule_marks()
        by_queue: dict[str, _Ticks] = {}
        for schedule in schedules:
            last = marks.get(schedule.name)
            last_tick = datetime.fromtimestamp(last, UTC) if last is not None else None
            due = schedule.due(last_tick, now)
            if last_tick is not None:
                _log_missed(schedule, last_tick, now, due)
            if due:
                task = self.registry.get_task(schedule.task)
                ticks = by_queue.setdefault(task.defaults.queue, _Ticks())
                ticks.jobs.extend(self._tick_job(task, schedule, tick) for tick in due)
                ticks.tasks.extend(task for _ in due)
                ticks.marks[schedule.name] = due[-1].timestamp()
        moved: dict[str, float] = {}
        for queue, ticks in by_queue.items():
            if await self._enqueue(queue, ticks, report):
                moved.update(ticks.marks)
        if moved:
            await store.mark_schedules(moved)
        for job_id in report.enqueued:
            log.info("scheduler: enqueued %s", job_id)
        for job_id in report.skipped:
            log.info("scheduler: skipped %s: the previous run is still pending", job_id)
        return report

    async def _enqueue(self, queue: str, ticks: _Ticks, report: PassReport) -> bool:
        """Store one queue's ticks; False if the queue is full (they stay due)."""
        try:
            result = await self.client.enqueue(ticks.jobs, ticks.tasks, depth="no_wait")
        except QueueFullError as exc:
            report.refused.extend(job.id for job in ticks.jobs)
            log.warning(
                "scheduler: %d tick(s) refused, tried again next pass: %s", len(ticks.jobs), exc
            )
            return False
        for i, job in enumerate(ticks.jobs):
            if i not in result.existing:
                report.enqueued.append(job.id)
            elif result.ids[i] == job.id:
                report.existing.append(job.id)
            else:  # the schedule's key is held by its previous, still pending run
                report.skipped.append(job.id)
        return True

    async def seconds_to_next_tick(self) -> float:
        """How long until the earliest next tick of any schedule (at most ``MAX_SLEEP_S``)."""
        schedules = list(self.registry.schedules.values())
        if not schedules:
            return MAX_SLEEP_S
        now = datetime.fromtimestamp(await self._now(), UTC)
        nearest = min(s.next_ticks(now, 1)[0] for s in schedules)
        return min(MAX_SLEEP_S, max(0.0, (nearest - now).total_seconds()))

    async def run(self, stop: asyncio.Event) -> None:
        """Pass after pass until ``stop`` is set; a failed pass is logged and retried with
        back-off (a broker outage does not end the scheduler)."""
        backoff = 0.1
        while not stop.is_set():
            try:
                await self.run_pass()
                delay = await self.seconds_to_next_tick()
                backoff = 0.1
            except Exception as exc:
                log.error("scheduler pass failed, retrying in %.1f s: %s", backoff, exc)
                delay, backoff = backoff, min(backoff * 2, 10.0)
            # a few ms past the tick: the broker's clock must have reached it when we look
            await self._sleep(delay + 0.005, stop)


MISSED_COUNT_CAP = 10_000
"""How many missed ticks a log line counts at most (a minutely cron down for months)."""


def _log_missed(schedule: Schedule, last: datetime, now: datetime, due: list[datetime]) -> None:
    """Log (WARNING) the ticks after ``last`` that every scheduler missed (older than the
    schedule's ``grace`` at ``now``) and that its ``misfire`` policy does not run."""
    cutoff = now - schedule.grace
    run = set(due)
    count, first, latest = 0, None, None
    for tick in schedule.ticks_after(last):
        if tick >= cutoff or count >= MISSED_COUNT_CAP:
            break
        if tick not in run:
            count += 1
            first = first or tick
            latest = tick
    if count:
        log.warning(
            "scheduler: schedule %s: %s%d missed tick(s) from %s to %s not run "
            "(misfire=%s; no scheduler ran at their time)",
            schedule.name,
            "at least " if count >= MISSED_COUNT_CAP else "",
            count,
            first.isoformat() if first else "?",
            latest.isoformat() if latest else "?",
            schedule.misfire,
        )


async def _sleep_unless_stopped(seconds: float, stop: asyncio.Event) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()


@dataclass(slots=True)
class _Ticks:
    """The due ticks of one queue's schedules, with their tasks and the marks they move."""

    jobs: list[NewJob] = field(default_factory=list)
    tasks: list[TaskDefinition] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ScheduleStatus:
    """A schedule as ``taskmill schedules`` shows it."""

    schedule: Schedule
    next_ticks: list[datetime]
    last_tick: datetime | None
    last_state: JobState | None
    """The state of the last tick's job (None: no such job, or it was pruned)."""
    last_job_id: str | None = None
    """The id of the last tick's job (None: the schedule never ticked). With ``last_state``
    None, that job was pruned, or never stored: the tick was skipped (``overlap="skip"``)
    while the run before it was pending."""


async def schedule_statuses(app: AppParts, n_next: int = 3) -> list[ScheduleStatus]:
    """Each schedule of ``app``, in the order declared: its next ticks, and its last tick's
    job and that job's state (three reads, however many schedules)."""
    broker = await app.client.abroker()
    now = datetime.fromtimestamp(await broker.now(), UTC)
    marks = await schedule_store(broker).schedule_marks()
    schedules = list(app.registry.schedules.values())
    lasts = [_last_tick(marks.get(s.name)) for s in schedules]
    job_ids = [
        None if last is None else tick_job_id(s, last)
        for s, last in zip(schedules, lasts, strict=True)
    ]
    found = await broker.get_many([i for i in job_ids if i is not None])
    states = {job.id: job.state for job in found if job is not None}
    return [
        ScheduleStatus(
            schedule=schedule,
            next_ticks=schedule.next_ticks(now, n_next),
            last_tick=last,
            last_state=None if job_id is None else states.get(job_id),
            last_job_id=job_id,
        )
        for schedule, last, job_id in zip(schedules, lasts, job_ids, strict=True)
    ]


def _last_tick(mark: float | None) -> datetime | None:
    return None if mark is None else datetime.fromtimestamp(mark, UTC)
