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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from taskmill.brokers.features import schedule_store
from taskmill.job import JobState, NewJob
from taskmill.schedules import Schedule

if TYPE_CHECKING:
    from taskmill.app import App

log = logging.getLogger("taskmill.scheduler")

MAX_SLEEP_S = 30.0
"""The longest a scheduler sleeps between passes, so a schedule's mark moved by another
scheduler or a clock step is seen within that long."""


@dataclass(frozen=True, slots=True)
class PassReport:
    """What one pass did: the jobs stored, the ticks another scheduler had stored already,
    and the ticks skipped because the previous run was still pending (``overlap="skip"``)."""

    enqueued: list[str]
    existing: list[str]
    skipped: list[str]


def tick_job_id(schedule: Schedule, tick: datetime) -> str:
    return schedule.key(tick)


def overlap_key(schedule: Schedule) -> str:
    return f"schedule:{schedule.name}"


class Scheduler:
    """Runs ``app``'s schedules (``app.schedules``). ``clock`` returns the time in Unix
    seconds (default: the broker's clock); tests inject one."""

    def __init__(self, app: App, *, clock: Callable[[], Awaitable[float]] | None = None) -> None:
        self.app = app
        self._clock = clock

    async def _now(self) -> float:
        if self._clock is not None:
            return await self._clock()
        return await (await self.app.abroker()).now()

    def _job(self, schedule: Schedule, tick: datetime) -> NewJob:
        task = self.app.get_task(schedule.task)
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
        schedules = list(self.app.schedules.values()) if schedules is None else list(schedules)
        report = PassReport([], [], [])
        if not schedules:
            return report
        broker = await self.app.abroker()
        store = schedule_store(broker)
        now = datetime.fromtimestamp(await self._now(), UTC)
        marks = await store.schedule_marks()
        jobs: list[NewJob] = []
        moved: dict[str, float] = {}
        for schedule in schedules:
            last = marks.get(schedule.name)
            due = schedule.due(datetime.fromtimestamp(last, UTC) if last is not None else None, now)
            if due:
                jobs.extend(self._job(schedule, tick) for tick in due)
                moved[schedule.name] = due[-1].timestamp()
        if jobs:
            result = await broker.enqueue(jobs, on_conflict="return")
            for i, job in enumerate(jobs):
                if i not in result.existing:
                    report.enqueued.append(job.id)
                elif result.ids[i] == job.id:
                    report.existing.append(job.id)
                else:  # the schedule's key is held by its previous, still pending run
                    report.skipped.append(job.id)
            await store.mark_schedules(moved)
        for job_id in report.enqueued:
            log.info("scheduler: enqueued %s", job_id)
        for job_id in report.skipped:
            log.info("scheduler: skipped %s: the previous run is still pending", job_id)
        return report

    async def seconds_to_next_tick(self) -> float:
        """How long until the earliest next tick of any schedule (at most ``MAX_SLEEP_S``)."""
        schedules = list(self.app.schedules.values())
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
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay + 0.005):
                    await stop.wait()


@dataclass(frozen=True, slots=True)
class ScheduleStatus:
    """A schedule as ``taskmill schedules`` shows it."""

    schedule: Schedule
    next_ticks: list[datetime]
    last_tick: datetime | None
    last_state: JobState | None
    """The state of the last tick's job (None: no such job, or it was pruned)."""


async def schedule_statuses(app: App, n_next: int = 3) -> list[ScheduleStatus]:
    broker = await app.abroker()
    now = datetime.fromtimestamp(await broker.now(), UTC)
    marks = await schedule_store(broker).schedule_marks()
    statuses = []
    for schedule in app.schedules.values():
        mark = marks.get(schedule.name)
        last = datetime.fromtimestamp(mark, UTC) if mark is not None else None
        job = await broker.get(tick_job_id(schedule, last)) if last is not None else None
        statuses.append(
            ScheduleStatus(
                schedule=schedule,
                next_ticks=schedule.next_ticks(now, n_next),
                last_tick=last,
                last_state=job.state if job is not None else None,
            )
        )
    return statuses
