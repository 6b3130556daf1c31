"""The admin API of ``App``: look at and manage queues, jobs, workers and tasks.

What ``taskmill`` (the CLI) and a dashboard are built on, so they need no broker calls of
their own. Every method has a sync form and an async one (``stats`` / ``astats``); the sync
form runs on the app's own loop thread, like ``send``. See docs/admin.md.

>>> from taskmill import App
>>> app = App("memory://")
>>> @app.task(queue="mail")
... def welcome(user_id: int) -> None: ...
>>> job = welcome.send(7)
>>> [(s.queue, s.counts["queued"]) for s in app.stats()]
[('mail', 1)]
>>> page = app.list_jobs(queue="mail")
>>> ([j.id for j in page.jobs] == [job.id], page.total, page.next_cursor)
(True, 1, None)
>>> app.close()
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import msgspec

from taskmill.brokers.base import JobPage, JobQuery, ListOrder
from taskmill.job import Job, JobState, MetaValue, QueueStats, WorkerInfo

if TYPE_CHECKING:
    from taskmill.client import Client
    from taskmill.registry import Registry

MAX_PAGE = 1000
"""The most jobs one ``list_jobs`` page holds."""
_RETRY_BATCH = 1000
MAX_THROUGHPUT_MINUTES = 24 * 60
"""The longest span ``throughput`` counts over: a day of minutes."""

StateFilter = JobState | str | Iterable[JobState | str] | None
"""One state, its name, or several (any of them)."""


class WorkerStatus(WorkerInfo):
    """A registered worker as ``App.workers()`` reports it: what the worker says of itself
    with its last heartbeat (``WorkerInfo``), and how long ago that was by the broker's clock.
    ``lost``: no heartbeat for ``MISSED_HEARTBEATS`` intervals (``taskmill.settings``), and
    no sign-off (it died)."""

    heartbeat_age_s: float = 0.0
    lost: bool = False


class ScheduleInfo(msgspec.Struct, frozen=True):
    """A periodic schedule of a task: a cron expression in a time zone, or an interval."""

    name: str
    cron: str | None
    every_s: float | None
    tz: str


class TaskInfo(msgspec.Struct, frozen=True):
    """A task registered in the app, with the defaults its sends use.

    ``retries``: extra attempts after the first; ``rate_limit``: at most this many starts
    across all workers (``"50/s"``); ``concurrency``: at most this many running at once (per
    key, if the limit has one)."""

    name: str
    queue: str
    priority: int
    retries: int
    timeout_s: float | None
    rate_limit: str | None
    concurrency: int | None
    schedules: list[ScheduleInfo]


class ThroughputPoint(msgspec.Struct, frozen=True):
    """The jobs that finished in one minute, by outcome. ``at``: the minute's start (seconds
    since the epoch, on the broker's clock, a multiple of 60)."""

    at: float
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0


class AdminAPI:
    """The admin methods of ``App`` (a mixin: ``App`` provides the registry of its tasks and
    schedules, and the client that reaches the broker)."""

    registry: Registry
    client: Client

    async def anow(self) -> float:
        """The broker's clock (seconds since the epoch): what job times are measured on, so
        ages shown beside them ("4m ago") are right even if this machine's clock is off."""
        return await (await self.client.abroker()).now()

    def now(self) -> float:
        """Blocking ``anow``.

        >>> import time
        >>> from taskmill import App
        >>> app = App("memory://")
        >>> abs(app.now() - time.time()) < 5
        True
        >>> app.close()
        """
        return self.client.run_sync(self.anow())

    # --- queues -------------------------------------------------------------------------------

    async def astats(self) -> list[QueueStats]:
        """Per queue: how many jobs are in each state, the oldest waiting job's age, paused
        or not. Queues of this app's tasks are listed even with no job yet."""
        stats = await (await self.client.abroker()).stats()
        seen = {s.queue for s in stats}
        for queue in sorted({t.defaults.queue for t in self.registry.tasks.values()} - seen):
            stats.append(QueueStats(queue=queue, counts={s.value: 0 for s in JobState}))
        return sorted(stats, key=lambda s: s.queue)

    def stats(self) -> list[QueueStats]:
        """Blocking ``astats``.

        >>> from taskmill import App
        >>> app = App("memory://")
        >>> @app.task(queue="reports")
        ... def build() -> None: ...
        >>> [(s.queue, sum(s.counts.values()), s.paused) for s in app.stats()]
        [('reports', 0, False)]
        >>> app.close()
        """
        return self.client.run_sync(self.astats())

    async def apause(self, queue: str) -> None:
        """Stop workers claiming from ``queue``: running jobs go on, sending still works."""
        await (await self.client.abroker()).pause(queue, True)

    def pause(self, queue: str) -> None:
        """Blocking ``apause``.

        >>> from taskmill import App
        >>> app = App("memory://")
        >>> @app.task(queue="mail")
        ... def welcome(user_id: int) -> None: ...
        >>> app.pause("mail")
        >>> [(s.queue, s.paused) for s in app.stats()]
        [('mail', True)]
        >>> app.resume("mail")
        >>> [(s.queue, s.paused) for s in app.stats()]
        [('mail', False)]
        >>> app.close()
        """
        self.client.run_sync(self.apause(queue))

    async def aresume(self, queue: str) -> None:
        """Let workers claim from ``queue`` again (idle workers are woken)."""
        await (await self.client.abroker()).pause(queue, False)

    def resume(self, queue: str) -> None:
        """Blocking ``aresume``."""
        self.client.run_sync(self.aresume(queue))

    async def apurge(self, queue: str) -> int:
        """Delete the scheduled and queued jobs of ``queue`` (running and finished jobs
        stay); how many were deleted."""
        return await (await self.client.abroker()).purge(queue)

    def purge(self, queue: str) -> int:
        """Blocking ``apurge``.

        >>> from taskmill import App
        >>> app = App("memory://")
        >>> @app.task()
        ... def work(n: int) -> None: ...
        >>> handles = work.send_many([(1,), (2,)])
        >>> app.purge("default")
        2
        >>> app.close()
        """
        return self.client.run_sync(self.apurge(queue))

    async def apurge_all(self) -> dict[str, int]:
        """``purge`` every queue the broker has jobs in, and this app's queues: how many jobs
        each lost (queues that lost none are left out). A queue that gets its first job while
        this runs may keep it."""
        purged = {}
        for queue in [s.queue for s in await self.astats()]:
            n = await self.apurge(queue)
            if n:
                purged[queue] = n
        return purged

    def purge_all(self) -> dict[str, int]:
        """Blocking ``apurge_all``.

        >>> from taskmill import App
        >>> app = App("memory://")
        >>> @app.task()
        ... def work(n: int) -> None: ...
        >>> _ = work.send(1), work.options(queue="bulk").send_many([(2,), (3,)])
        >>> app.purge_all()
        {'bulk': 2, 'default': 1}
        >>> app.close()
        """
        return self.client.run_sync(self.apurge_all())

    # --- jobs ---------------------------------------------------------------------------------

    async def alist_jobs(
        self,
        *,
        state: StateFilter = None,
        queue: str | None = None,
        task: str | None = None,
        meta: Mapping[str, MetaValue] | None = None,
        order: ListOrder = "enqueued",
        limit: int = 50,
        cursor: str | None = None,
        count: bool = True,
    ) -> JobPage:
        """One page of jobs, newest first.

        Filters (all that are given must match): ``state`` (a state or its name, or several),
        ``queue``, ``task`` (a prefix of the task's name), ``meta`` (the job's metadata holds
        each pair). ``order="finished"``: finished jobs only, the latest finished first.

        ``limit`` (1 to ``MAX_PAGE``) jobs at most; ``JobPage.next_cursor`` is the
        ``cursor`` of the next page (None on the last). Paging goes from the last row seen
        (keyset), so a deep page costs what the first does, and jobs sent meanwhile do not
        shift pages. ``count``: also count every job the filters match (``JobPage.total``,
        for "50 of 417"); that may read every job the filters select (see docs/admin.md),
        so later pages may pass ``count=False``.
        """
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"limit must be a whole number from 1 to {MAX_PAGE}, not {limit!r}")
        query = JobQuery(
            states=_states(state), queue=queue, task=task, meta=meta or {}, order=order
        )
        broker = await self.client.abroker()
        return await broker.find_jobs(query, limit=limit, cursor=cursor, count=count)

    def list_jobs(
        self,
        *,
        state: StateFilter = None,
        queue: str | None = None,
        task: str | None = None,
        meta: Mapping[str, MetaValue] | None = None,
        order: ListOrder = "enqueued",
        limit: int = 50,
        cursor: str | None = None,
        count: bool = True,
    ) -> JobPage:
        """Blocking ``alist_jobs``.

        >>> from taskmill import App
        >>> app = App("memory://")
        >>> @app.task()
        ... def add(a: int, b: int) -> int:
        ...     return a + b
        >>> handles = add.send_many([(n, n) for n in range(5)])
        >>> first = app.list_jobs(state="queued", limit=2)
        >>> len(first.jobs), first.total
        (2, 5)
        >>> rest = app.list_jobs(state="queued", limit=2, cursor=first.next_cursor, count=False)
        >>> [j.id for j in first.jobs + rest.jobs] == [h.id for h in reversed(handles)][:4]
        True
        >>> app.close()
        """
        return self.client.run_sync(
            self.alist_jobs(
                state=state,
                queue=queue,
                task=task,
                meta=meta,
                order=order,
                limit=limit,
                cursor=cursor,
                count=count,
            )
        )

    async def aretry_jobs(
        self,
        ids: Iterable[str] | None = None,
        *,
        queue: str | None = None,
        task: str | None = None,
    ) -> list[str]:
        """Put jobs back in their queue with a fresh attempt budget: the failed or cancelled
        jobs ``ids``, or (no ids) every failed job, of ``queue`` and of tasks whose name
        starts with ``task`` if given. The requeued ids; a job in another state, or whose
        unique key another pending job holds, is left as it is."""
        broker = await self.client.abroker()
        if ids is not None:
            if queue is not None or task is not None:
                raise ValueError("retry_jobs takes job ids or queue=/task= filters, not both")
            return await broker.retry(list(ids))
        if queue is None and task is None:
            return await broker.retry(None)
        query = JobQuery(states=frozenset({JobState.FAILED}), queue=queue, task=task)
        found: list[str] = []
        cursor = None
        while True:  # collect first: retrying while paging would move jobs under the cursor
            page = await broker.find_jobs(query, limit=MAX_PAGE, cursor=cursor)
            found += [j.id for j in page.jobs]
            cursor = page.next_cursor
            if cursor is None:
                break
        retried = []
        for start in range(0, len(found), _RETRY_BATCH):
            retried += await broker.retry(found[start : start + _RETRY_BATCH])
        return retried

    def retry_jobs(
        self,
        ids: Iterable[str] | None = None,
        *,
        queue: str | None = None,
        task: str | None = None,
    ) -> list[str]:
        """Blocking ``aretry_jobs``.

        >>> from taskmill import App
        >>> app = App("memory://")
        >>> @app.task(retries=0)
        ... def flaky() -> None:
        ...     raise RuntimeError("down")
        >>> handle = flaky.send()
        >>> app.run_until_idle()
        1
        >>> app.retry_jobs(queue="default") == [handle.id]
        True
        >>> handle.status()
        <JobState.QUEUED: 'queued'>
        >>> app.close()
        """
        return self.client.run_sync(self.aretry_jobs(ids, queue=queue, task=task))

    async def ajob_by_key(self, key: str) -> Job | None:
        """The job holding unique ``key`` now (a ``Job``, as ``aget_job`` returns), or None.

        Only a pending job (scheduled, queued or running) holds its key: that is the job a
        send with the same key would return (``on_conflict="return"``) or be refused for
        (``"raise"``). Once it finishes the key is free, and a finished job is not found by
        it (look it up by id)."""
        if not isinstance(key, str) or not key:
            raise ValueError(f"key must be a non-empty str, not {key!r}")
        return await (await self.client.abroker()).get_by_key(key)

    def job_by_key(self, key: str) -> Job | None:
        """Blocking ``ajob_by_key``.

        >>> from taskmill import App
        >>> app = App("memory://")
        >>> @app.task()
        ... def sync_user(user_id: int) -> None: ...
        >>> handle = sync_user.options(key="user-7").send(7)
        >>> app.job_by_key("user-7").id == handle.id
        True
        >>> app.job_by_key("user-8") is None
        True
        >>> app.close()
        """
        return self.client.run_sync(self.ajob_by_key(key))

    async def acancel_job(self, job_id: str) -> JobState:
        """Cancel a job: scheduled or queued, it is cancelled and never runs; running, it is
        asked to stop (``running`` is returned). The job's state after the call (a finished
        job's is unchanged); ``JobNotFoundError`` if there is no such job."""
        return await self.client.acancel_job(job_id)

    def cancel_job(self, job_id: str) -> JobState:
        """Blocking ``acancel_job``.

        >>> from taskmill import App
        >>> app = App("memory://")
        >>> @app.task()
        ... def later() -> None: ...
        >>> handle = later.options(delay=3600).send()
        >>> app.cancel_job(handle.id)
        <JobState.CANCELLED: 'cancelled'>
        >>> app.close()
        """
        return self.client.run_sync(self.acancel_job(job_id))

    async def arun_job_now(self, job_id: str) -> JobState:
        """Make a scheduled job due now; the state it was in before (see
        ``JobHandle.run_now``)."""
        return await self.client.arun_job_now(job_id)

    def run_job_now(self, job_id: str) -> JobState:
        """Blocking ``arun_job_now``: a delayed job, or one waiting for its retry, becomes
        queued and due now, its attempt count unchanged. Returns the state before the call:
        ``SCHEDULED`` (moved), ``QUEUED`` (nothing to do), or a running or finished state
        (nothing changed: such a job cannot run now).

        >>> from taskmill import App
        >>> app = App("memory://")
        >>> @app.task()
        ... def later() -> None: ...
        >>> handle = later.options(delay=3600).send()
        >>> app.run_job_now(handle.id), handle.status()
        (<JobState.SCHEDULED: 'scheduled'>, <JobState.QUEUED: 'queued'>)
        >>> app.close()
        """
        return self.client.run_sync(self.arun_job_now(job_id))

    async def adelete_jobs(
        self,
        ids: Iterable[str] | None = None,
        *,
        state: StateFilter = None,
        queue: str | None = None,
        task: str | None = None,
    ) -> list[str]:
        """Delete finished (succeeded, failed or cancelled) jobs: those of ``ids``, or (no
        ids) every finished job matching the filters, as ``list_jobs`` reads them (``state``:
        finished states only, default all three; ``queue``; ``task``, a name prefix), at
        least one of which must be given. The ids deleted; a job that is not finished (or
        not stored) is left as it is."""
        broker = await self.client.abroker()
        if ids is not None:
            if state is not None or queue is not None or task is not None:
                raise ValueError(
                    "delete_jobs takes job ids or state=/queue=/task= filters, not both"
                )
            return await broker.delete(list(dict.fromkeys(ids)))
        if state is None and queue is None and task is None:
            raise ValueError(
                "delete_jobs needs job ids or at least one filter (state=, queue=, task=); "
                "to delete every finished job, pass state=('succeeded', 'failed', 'cancelled')"
            )
        query = JobQuery(states=_states(state), queue=queue, task=task, order="finished")
        deleted: list[str] = []
        cursor = None
        while True:  # deleting the rows behind the cursor moves none of those ahead of it
            page = await broker.find_jobs(query, limit=MAX_PAGE, cursor=cursor)
            deleted += await broker.delete([j.id for j in page.jobs])
            cursor = page.next_cursor
            if cursor is None:
                return deleted

    def delete_jobs(
        self,
        ids: Iterable[str] | None = None,
        *,
        state: StateFilter = None,
        queue: str | None = None,
        task: str | None = None,
    ) -> list[str]:
        """Blocking ``adelete_jobs``.

        >>> from taskmill import App
        >>> app = App("memory://")
        >>> @app.task()
        ... def work(n: int) -> None: ...
        >>> done, waiting = work.send(1), work.options(delay=3600).send(2)
        >>> app.run_until_idle()
        1
        >>> app.delete_jobs([done.id, waiting.id]) == [done.id]  # only finished jobs go
        True
        >>> app.delete_jobs(state="succeeded")
        []
        >>> app.close()
        """
        return self.client.run_sync(self.adelete_jobs(ids, state=state, queue=queue, task=task))

    # --- throughput ---------------------------------------------------------------------------

    async def athroughput(
        self, minutes: int = 60, *, queue: str | None = None
    ) -> list[ThroughputPoint]:
        """How many jobs finished in each of the last ``minutes`` minutes (1 to
        ``MAX_THROUGHPUT_MINUTES``) by outcome, of ``queue`` or of every queue: one point
        per minute, oldest first, the last being the minute under way (by the broker's
        clock), minutes with none included."""
        if (
            isinstance(minutes, bool)
            or not isinstance(minutes, int)
            or not 1 <= minutes <= MAX_THROUGHPUT_MINUTES
        ):
            raise ValueError(
                f"minutes must be a whole number from 1 to {MAX_THROUGHPUT_MINUTES}, "
                f"not {minutes!r}"
            )
        broker = await self.client.abroker()
        current = int(await broker.now() // 60)
        first = current - minutes + 1
        counts: dict[int, dict[str, int]] = {m: {} for m in range(first, current + 1)}
        for minute, job_state, n in await broker.finished_per_minute(first * 60.0, queue):
            if minute in counts:  # a job finishing as we read may be in a minute after ours
                counts[minute][job_state.value] = n
        return [ThroughputPoint(at=m * 60.0, **counts[m]) for m in sorted(counts)]

    def throughput(self, minutes: int = 60, *, queue: str | None = None) -> list[ThroughputPoint]:
        """Blocking ``athroughput``.

        >>> from taskmill import App
        >>> app = App("memory://")
        >>> @app.task(retries=0)
        ... def check(n: int) -> None:
        ...     assert n > 0
        >>> handles = check.send_many([(1,), (2,), (0,)])
        >>> app.run_until_idle()
        3
        >>> points = app.throughput(minutes=5)
        >>> len(points), sum(p.succeeded for p in points), sum(p.failed for p in points)
        (5, 2, 1)
        >>> app.close()
        """
        return self.client.run_sync(self.athroughput(minutes, queue=queue))

    # --- workers and tasks --------------------------------------------------------------------

    async def aworkers(self) -> list[WorkerStatus]:
        """The registered worker processes, oldest first, each with its last heartbeat's age
        and whether it is lost (by this app's heartbeat setting)."""
        broker = await self.client.abroker()
        found = await broker.list_workers()
        now = await broker.now()
        lost_after = self.client.settings.lost_after_s
        return [
            WorkerStatus(
                **msgspec.structs.asdict(w),
                heartbeat_age_s=max(0.0, now - w.heartbeat_at),
                lost=now - w.heartbeat_at > lost_after,
            )
            for w in found
        ]

    def workers(self) -> list[WorkerStatus]:
        """Blocking ``aworkers``.

        >>> from taskmill import App
        >>> App("memory://").workers()
        []
        """
        return self.client.run_sync(self.aworkers())

    def registered_tasks(self) -> list[TaskInfo]:
        """This app's tasks by name, with their defaults and schedules (no I/O).

        >>> from taskmill import App
        >>> app = App("memory://")
        >>> @app.periodic(cron="0 2 * * *", tz="Europe/Paris")
        ... @app.task(name="reports.nightly", queue="reports", retries=1, rate_limit="10/m")
        ... def nightly() -> None: ...
        >>> (info,) = app.registered_tasks()
        >>> info.name, info.queue, info.retries, info.rate_limit, info.schedules[0].cron
        ('reports.nightly', 'reports', 1, '10/m', '0 2 * * *')
        """
        by_task: dict[str, list[ScheduleInfo]] = {}
        for s in self.registry.schedules.values():
            every = None if s.every is None else s.every.total_seconds()
            by_task.setdefault(s.task, []).append(ScheduleInfo(s.name, s.cron, every, s.tz))
        return [
            TaskInfo(
                name=t.name,
                queue=t.defaults.queue,
                priority=t.defaults.priority,
                retries=t.defaults.max_attempts - 1,
                timeout_s=t.defaults.timeout_s,
                rate_limit=_rate_text(t.rate_interval_s),
                concurrency=None if t.concurrency is None else t.concurrency.max,
                schedules=by_task.get(t.name, []),
            )
            for t in sorted(self.registry.tasks.values(), key=lambda t: t.name)
        ]


def _states(state: StateFilter) -> frozenset[JobState]:
    if state is None:
        return frozenset()
    if isinstance(state, str):  # a JobState is a str too
        return frozenset({JobState.parse(state)})
    return frozenset(JobState.parse(s) for s in state)


def _rate_text(interval_s: float | None) -> str | None:
    """A rate limit as it was likely written: ``"50/s"``, ``"10/m"``, ``"100/h"``."""
    if interval_s is None:
        return None
    for unit, seconds in (("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        per = seconds / interval_s
        if abs(per - round(per)) < 1e-9 * per and round(per) >= 1:
            return f"{round(per)}/{unit}"
    return f"{1 / interval_s:g}/s"


__all__ = [
    "MAX_PAGE",
    "MAX_THROUGHPUT_MINUTES",
    "AdminAPI",
    "JobPage",
    "ScheduleInfo",
    "TaskInfo",
    "ThroughputPoint",
    "WorkerStatus",
]
