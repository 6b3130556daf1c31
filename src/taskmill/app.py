"""The app: a registry of tasks, the broker its URL names, and the settings."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping, Sequence
from datetime import timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar, cast, overload
from urllib.parse import parse_qsl, urlsplit

from taskmill.admin import AdminAPI
from taskmill.brokers import Broker
from taskmill.client import Client
from taskmill.errors import ConfigurationError, UnknownScheduleError, UnknownTaskError
from taskmill.events import Event, subscribe
from taskmill.handle import JobHandle
from taskmill.hooks import Hook, Hooks, Instrumentation
from taskmill.job import Job
from taskmill.limits import Limit, QueueOptions, WhenFull, parse_rate
from taskmill.meta import check_meta
from taskmill.names import check_name
from taskmill.registry import Registry
from taskmill.retry import Backoff, RetryPolicy, as_backoff, exception_types
from taskmill.scheduler import ScheduleStatus, overlap_key, schedule_statuses
from taskmill.schedules import Misfire, Overlap, Schedule
from taskmill.serialization import encode_payload
from taskmill.settings import Settings
from taskmill.task import (
    KeyFunc,
    Priority,
    Seconds,
    SendOptions,
    Task,
    _attempts,
    check_priority,
    check_time_limits,
    seconds,
    timeout_seconds,
)
from taskmill.urls import redact_url
from taskmill.workflows import (
    WorkflowStatus,
    resume,
    running_workflow_statuses,
    workflow_status,
)

if TYPE_CHECKING:
    from taskmill.worker.embed import EmbeddedWorker, WorkerThread

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

DEFAULT_URL = "sqlite:///taskmill.db"


class TaskDecorator(Protocol):
    @overload
    def __call__(self, fn: Callable[P, Coroutine[Any, Any, R]], /) -> Task[P, R]: ...
    @overload
    def __call__(self, fn: Callable[P, R], /) -> Task[P, R]: ...


class ScheduleDecorator(Protocol):
    """What ``app.periodic(...)`` returns: it takes a task, or a plain function it registers
    as one, and returns the task with the function's signature."""

    @overload
    def __call__(self, target: Task[P, R], /) -> Task[P, R]: ...
    @overload
    def __call__(self, target: Callable[P, Coroutine[Any, Any, R]], /) -> Task[P, R]: ...
    @overload
    def __call__(self, target: Callable[P, R], /) -> Task[P, R]: ...


class App(AdminAPI):
    """Tasks, a broker and settings. Declaring tasks does no I/O; the broker is connected on
    first use, and closed by ``close()`` (or the ``with`` block). The admin API (``stats``,
    ``list_jobs``, ``retry_jobs``, ``cancel_job``, ``purge``, ``pause``, ``workers``,
    ``registered_tasks``, …) is in ``taskmill.admin``.

    An app is two parts: ``registry`` (``taskmill.registry``: what is declared: tasks,
    schedules, queue options, hooks) and ``client`` (``taskmill.client``: the broker, the
    sync bridge, the enqueue pipeline every job goes through, job lookups).

    >>> app = App("memory://")
    >>> @app.task(queue="mail", retries=5, backoff=Backoff(base=2, cap=300))
    ... async def send_welcome(user_id: int) -> None: ...
    >>> sorted(app.tasks)
    ['taskmill.app.send_welcome']

    The URL comes from the argument, else ``TASKMILL_URL``, else ``sqlite:///taskmill.db``.
    Other keyword arguments are ``Settings`` fields (``lease_s``, ``result_ttl_s``, …).
    """

    def __init__(self, url: str | None = None, **settings: Any) -> None:
        url = url or os.environ.get("TASKMILL_URL") or DEFAULT_URL
        self.registry = Registry()
        self.client = Client(
            url, Settings.build(settings), self.registry, eager=self if _eager_flag(url) else None
        )

    def __repr__(self) -> str:
        return f"<App {redact_url(self.url)} tasks={len(self.tasks)}>"

    @property
    def url(self) -> str:
        return self.client.url

    @property
    def settings(self) -> Settings:
        return self.client.settings

    @property
    def eager(self) -> bool:
        """Each send runs its jobs at once, in this process (``memory://?eager=1``)."""
        return self.client.eager is not None

    @property
    def tasks(self) -> dict[str, Task[Any, Any]]:
        """The registered tasks by name (``app.task`` registers only ``Task`` objects)."""
        return cast(dict[str, Task[Any, Any]], self.registry.tasks)

    @property
    def schedules(self) -> dict[str, Schedule]:
        return self.registry.schedules

    @property
    def queue_options(self) -> dict[str, QueueOptions]:
        return self.registry.queue_options

    @property
    def hooks(self) -> Hooks:
        """The app-wide hooks (``taskmill.hooks``)."""
        return self.registry.hooks

    # --- tasks ------------------------------------------------------------------------------

    @overload
    def task(self, fn: Callable[P, Coroutine[Any, Any, R]], /) -> Task[P, R]: ...
    @overload
    def task(self, fn: Callable[P, R], /) -> Task[P, R]: ...
    @overload
    def task(
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        queue: str | None = None,
        priority: Priority = 0,
        retries: int = 3,
        backoff: float | Backoff | None = None,
        retry_on: Sequence[type[BaseException]] | type[BaseException] | None = None,
        dont_retry_on: Sequence[type[BaseException]] | type[BaseException] | None = None,
        timeout: Seconds | None = None,
        soft_timeout: Seconds | None = None,
        key: str | KeyFunc | None = None,
        accepts_failures: bool = False,
        rate_limit: str | None = None,
        concurrency: Limit | None = None,
        on_enqueue: Hook | Sequence[Hook] | None = None,
        on_start: Hook | Sequence[Hook] | None = None,
        on_success: Hook | Sequence[Hook] | None = None,
        on_failure: Hook | Sequence[Hook] | None = None,
        on_retry: Hook | Sequence[Hook] | None = None,
    ) -> TaskDecorator: ...

    def task(
        self,
        fn: Callable[..., Any] | None = None,
        /,
        *,
        name: str | None = None,
        queue: str | None = None,
        priority: Priority = 0,
        retries: int = 3,
        backoff: float | Backoff | None = None,
        retry_on: Sequence[type[BaseException]] | type[BaseException] | None = None,
        dont_retry_on: Sequence[type[BaseException]] | type[BaseException] | None = None,
        timeout: Seconds | None = None,
        soft_timeout: Seconds | None = None,
        key: str | KeyFunc | None = None,
        accepts_failures: bool = False,
        rate_limit: str | None = None,
        concurrency: Limit | None = None,
        on_enqueue: Hook | Sequence[Hook] | None = None,
        on_start: Hook | Sequence[Hook] | None = None,
        on_success: Hook | Sequence[Hook] | None = None,
        on_failure: Hook | Sequence[Hook] | None = None,
        on_retry: Hook | Sequence[Hook] | None = None,
    ) -> Any:
        """Register a function as a task (``@app.task`` or ``@app.task(...)``).

        - ``retries``: extra attempts after the first (default 3); ``backoff``: seconds
          between attempts, or a ``Backoff`` policy (default exponential from 1 s, jittered,
          capped at 1 h).
        - ``retry_on`` / ``dont_retry_on``: which exceptions are retried (default: every
          ``Exception``); a ``dont_retry_on`` match fails the job at once.
        - ``priority``: higher runs first within a queue: a whole number from -1000 to 1000,
          or ``"urgent"`` (100), ``"high"`` (50), ``"normal"`` (0, the default), ``"low"`` (-50).
        - ``timeout``: seconds a run may take, more than 0, its hard limit (async: cancelled;
          ``--pool process``: the child and the processes it started are killed; thread pool:
          the job is failed and the thread left to finish).
        - ``soft_timeout``: seconds after which the task is told to wrap up, before
          ``timeout``: ``SoftTimeLimitExceeded`` is raised inside it (async tasks, ``--pool
          process``) and ``current_job().soft_limit_exceeded`` and ``.cancelled`` are set
          (every pool; the thread pool's only signal). See docs/guarantees.md#timeouts.
        - ``key``: a unique key (or a function of the task's arguments returning one): while a
          job with that key is pending, sending again returns the pending job.
        - ``rate_limit``: at most this many starts across all workers, ``"10/s"``, ``"500/m"``
          or ``"100/h"``; jobs over it wait in the worker (not failed, no attempt spent).
        - ``concurrency``: a ``Limit(max=N, key=fn)``: at most N jobs running at once across
          all workers, per value of ``fn(*args, **kwargs)``; jobs over it wait.
        - ``on_enqueue``, ``on_start``, ``on_success``, ``on_failure``, ``on_retry``: this
          task's hooks (a callable or a list), run before the app's (``taskmill.hooks``).
        - ``accepts_failures``: as a chord's callback, run even if members failed, with their
          errors in its input (see ``taskmill.workflows.chord``).
        """
        policy = RetryPolicy(
            backoff=as_backoff(backoff) if backoff is not None else Backoff(),
            retry_on=exception_types(retry_on) or (Exception,),
            dont_retry_on=exception_types(dont_retry_on),
        )
        defaults = SendOptions(
            queue=queue or self.settings.default_queue,
            priority=check_priority(priority),
            max_attempts=_attempts(retries),
            timeout_s=timeout_seconds(timeout),
            soft_timeout_s=seconds(soft_timeout, "soft_timeout"),
            key=key,
        )

        rate_interval_s = parse_rate(rate_limit) if rate_limit is not None else None

        def register(f: Callable[..., Any]) -> Task[Any, Any]:
            task_name = name or f"{f.__module__}.{f.__qualname__}"
            if "<locals>" in task_name and name is None:
                task_name = task_name.replace(".<locals>", "")
            check_time_limits(defaults.soft_timeout_s, defaults.timeout_s, task_name)
            t: Task[Any, Any] = Task(
                self.client, f, name=task_name, defaults=defaults, policy=policy
            )
            t.accepts_failures = accepts_failures
            t.rate_interval_s = rate_interval_s
            t.concurrency = concurrency
            t.hooks.add("on_enqueue", on_enqueue)
            t.hooks.add("on_start", on_start)
            t.hooks.add("on_success", on_success)
            t.hooks.add("on_failure", on_failure)
            t.hooks.add("on_retry", on_retry)
            self.registry.add_task(t)
            return t

        return register(fn) if fn is not None else register

    def periodic(
        self,
        *,
        cron: str | None = None,
        every: timedelta | float | None = None,
        tz: str = "UTC",
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        name: str | None = None,
        misfire: Misfire = "skip",
        max_misfires: int = 100,
        overlap: Overlap = "allow",
        meta: Mapping[str, Any] | None = None,
    ) -> ScheduleDecorator:
        """Run a task on a schedule: a ``cron`` expression evaluated in ``tz``, or ``every``
        fixed interval (a ``timedelta`` or seconds), with fixed ``args``/``kwargs``. Put it
        above ``@app.task(...)``, or on a plain function (registered with the defaults).

        Every worker runs the scheduler (``--no-scheduler`` to opt out; ``taskmill
        scheduler`` runs one alone); each tick is enqueued once however many run. ``misfire``:
        ticks missed while no scheduler ran are skipped (``"skip"``), the latest is run
        (``"once"``), or up to ``max_misfires`` of them are (``"all"``). ``overlap="skip"``
        skips a tick while the previous run is still pending. ``meta`` is stored on each
        tick's job (``Job.meta``). See docs/schedules.md.

        >>> from datetime import timedelta
        >>> app = App("memory://")
        >>> @app.periodic(cron="0 2 * * *", tz="Europe/Paris")
        ... @app.task(retries=1)
        ... def nightly_report() -> None: ...
        >>> @app.periodic(every=timedelta(hours=6), args=("eu",), name="sync-eu")
        ... def sync(region: str) -> None: ...
        >>> sorted(app.schedules)
        ['sync-eu', 'taskmill.app.nightly_report']
        """
        interval = timedelta(seconds=every) if isinstance(every, int | float) else every
        if name is not None:
            check_name("schedule", name)  # before the function is registered as a task

        def register(target: Task[Any, Any] | Callable[..., Any]) -> Task[Any, Any]:
            task: Task[Any, Any] = target if isinstance(target, Task) else self.task(target)
            if task.client is not self.client:
                raise ConfigurationError(f"task {task.name!r} belongs to another app")
            schedule = Schedule(
                name=name or task.name,
                task=task.name,
                cron=cron,
                every=interval,
                tz=tz,
                args=tuple(args),
                kwargs=dict(kwargs or {}),
                misfire=misfire,
                max_misfires=max_misfires,
                overlap=overlap,
                meta=check_meta(meta or {}),
            )
            task.bind_check(schedule.args, schedule.kwargs)
            # stored at every tick: what cannot be stored is refused now, not at the first tick
            encode_payload(task.name, schedule.args, dict(schedule.kwargs), task.max_payload_bytes)
            self.registry.add_schedule(schedule)
            return task

        return cast(ScheduleDecorator, register)

    def configure_queue(
        self,
        name: str,
        *,
        rate_limit: str | None = None,
        max_depth: int | None = None,
        when_full: WhenFull = "raise",
        full_timeout_s: float = 30.0,
    ) -> None:
        """Limits of a queue, for every task that uses it. ``rate_limit``: at most this many
        starts across all workers (``"50/s"``). ``max_depth``: at most this many jobs
        scheduled or queued; past it ``send`` raises ``QueueFullError`` or, with
        ``when_full="wait"``, waits up to ``full_timeout_s`` for room. The limit holds for
        every job sent to the queue: sends, periodic ticks, workflow steps (see
        ``taskmill.client``). See ``taskmill.limits``.
        """
        self.registry.configure_queue(
            name,
            rate_limit=rate_limit,
            max_depth=max_depth,
            when_full=when_full,
            full_timeout_s=full_timeout_s,
        )

    def get_task(self, name: str) -> Task[Any, Any]:
        """The task registered under ``name``; ``UnknownTaskError`` lists the known names."""
        return cast(Task[Any, Any], self.registry.get_task(name))

    def queues(self) -> list[str]:
        """Every queue a registered task sends to by default, and the default queue."""
        return self.registry.queues(self.settings.default_queue)

    # --- broker -----------------------------------------------------------------------------

    @property
    def broker(self) -> Broker:
        """The broker object (made on first access, not yet connected)."""
        return self.client.broker

    async def abroker(self) -> Broker:
        """The broker, connected."""
        return await self.client.abroker()

    def run_sync(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the app's private loop thread and wait for it."""
        return self.client.run_sync(coro)

    def open(self) -> App:
        self.client.open()
        return self

    async def aopen(self) -> App:
        await self.client.aopen()
        return self

    def close(self) -> None:
        self.client.close()

    async def aclose(self) -> None:
        await self.client.aclose()

    def __enter__(self) -> App:
        return self.open()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    async def __aenter__(self) -> App:
        return await self.aopen()

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def events(
        self,
        *,
        job_id: str | Sequence[str] | None = None,
        workflow_id: str | None = None,
        queue: str | None = None,
    ) -> AsyncIterator[Event]:
        """Live events of jobs (every transition and progress report), from any process,
        each job's in order; filtered by job, workflow or queue. Needs ``events=True`` in the
        apps that send and run the jobs. See ``taskmill.events``."""
        return subscribe(self.client, job_id=job_id, workflow_id=workflow_id, queue=queue)

    # --- app-wide hooks (see taskmill.hooks) --------------------------------------------------

    def on_enqueue(self, hook: Hook) -> Hook:
        """Call ``hook(job)`` once the broker stored a job (``job``: the ``NewJob``)."""
        self.hooks.add("on_enqueue", hook)
        return hook

    def on_start(self, hook: Hook) -> Hook:
        """Call ``hook(job)`` in the worker just before a job's function runs."""
        self.hooks.add("on_start", hook)
        return hook

    def on_success(self, hook: Hook) -> Hook:
        """Call ``hook(job, result)`` in the worker after a job succeeded."""
        self.hooks.add("on_success", hook)
        return hook

    def on_failure(self, hook: Hook) -> Hook:
        """Call ``hook(job, error)`` in the worker after a job failed for good."""
        self.hooks.add("on_failure", hook)
        return hook

    def on_retry(self, hook: Hook) -> Hook:
        """Call ``hook(job, error, delay)`` in the worker when a job will be retried."""
        self.hooks.add("on_retry", hook)
        return hook

    # --- instrumentation (see taskmill.hooks.Instrumentation) ---------------------------------

    def add_instrumentation(self, instrumentation: Instrumentation) -> None:
        """Wrap every send of this app and every run of its jobs in ``instrumentation``'s
        context managers (``taskmill.hooks.Instrumentation``), after those added before.
        Add it in the producer and in the worker (the app's module is the place for both);
        ``taskmill.integrations.otel.instrument(app)`` adds tracing this way."""
        if instrumentation not in self.registry.instrumentations:
            self.registry.instrumentations.append(instrumentation)

    def remove_instrumentation(self, instrumentation: Instrumentation) -> None:
        """Stop wrapping sends and runs in ``instrumentation`` (no error if it was not added)."""
        if instrumentation in self.registry.instrumentations:
            self.registry.instrumentations.remove(instrumentation)

    def send_task(
        self,
        name: str,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        external: bool = False,
        **options: Any,
    ) -> JobHandle[Any]:
        """Enqueue by task name (CLI, HTTP API, other languages' producers).

        With the task registered here, arguments are checked against its signature and its
        defaults apply. A name this app does not have is an ``UnknownTaskError`` (listing the
        names it has), unless ``external=True`` says the task is defined elsewhere, or the app
        has no tasks at all (a producer that only knows the URL): then the job is stored as
        given (``queue`` defaults to the app's default queue) and the worker that has the task
        checks the arguments. ``options`` are those of ``Task.options``.

        >>> app = App("memory://")
        >>> @app.task(name="add")
        ... def add(a: int, b: int) -> int: ...
        >>> app.send_task("ad", [1, 2])
        Traceback (most recent call last):
        taskmill.errors.UnknownTaskError: no task named 'ad' is registered in this app (known: add)
        >>> app.send_task("billing.charge", [42], external=True).existing
        False
        """
        return self.run_sync(self.asend_task(name, args, kwargs, external=external, **options))

    async def asend_task(
        self,
        name: str,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        external: bool = False,
        **options: Any,
    ) -> JobHandle[Any]:
        task = self.tasks.get(name)
        if task is None and self.tasks and not external:
            self.get_task(name)  # raises, listing the names this app has
        if task is None:
            task = Task(
                self.client,
                _unregistered,
                name=check_name("task", name),
                defaults=SendOptions(queue=self.settings.default_queue),
                policy=RetryPolicy(backoff=Backoff()),
            )
        return await task.options(**options).asend(*args, **(kwargs or {}))

    def trigger_schedule(self, name: str) -> JobHandle[Any]:
        """Blocking ``atrigger_schedule``.

        >>> app = App("memory://")
        >>> @app.periodic(cron="0 2 * * *", args=("eu",), name="nightly-eu")
        ... @app.task(name="reports.build")
        ... def build(region: str) -> None: ...
        >>> handle = app.trigger_schedule("nightly-eu")
        >>> job = handle.info()
        >>> job.task, job.state.value, job.payload
        ('reports.build', 'queued', b'[["eu"],{}]')
        >>> app.trigger_schedule("nightly")
        Traceback (most recent call last):
        taskmill.errors.UnknownScheduleError: no schedule named 'nightly' (known: nightly-eu)
        """
        return self.run_sync(self.atrigger_schedule(name))

    async def atrigger_schedule(self, name: str) -> JobHandle[Any]:
        """Send a periodic schedule's job now, outside its timetable: its task with the
        schedule's arguments and ``meta``, the task's defaults. The schedule's own ticks are
        not moved. With ``overlap="skip"``, a run still pending is returned instead (its
        handle's ``existing`` is set). ``UnknownScheduleError`` for a name the app lacks."""
        schedule = self.schedules.get(name)
        if schedule is None:
            known = ", ".join(sorted(self.schedules)) or "none"
            raise UnknownScheduleError(f"no schedule named {name!r} (known: {known})")
        task = self.get_task(schedule.task)
        key = overlap_key(schedule) if schedule.overlap == "skip" else None
        bound = task.options(meta=dict(schedule.meta), key=key)
        return await bound.asend(*schedule.args, **schedule.kwargs)

    # --- jobs -------------------------------------------------------------------------------

    def job(self, job_id: str) -> JobHandle[Any]:
        """A handle for a job id (no I/O)."""
        return JobHandle(self.client, job_id)

    def get_job(self, job_id: str) -> Job:
        """The stored job record; ``JobNotFoundError`` if there is none."""
        return self.client.run_sync(self.client.aget_job(job_id))

    async def aget_job(self, job_id: str) -> Job:
        return await self.client.aget_job(job_id)

    # --- schedules and workflows (the admin API, beside taskmill.admin's) ----------------------

    async def aschedule_statuses(self, n_next: int = 3) -> list[ScheduleStatus]:
        """Each periodic schedule of this app, in the order declared: its ``n_next`` next
        tick times, and its last tick: when, the id of the job it enqueued and that job's
        state now (see ``taskmill.scheduler.ScheduleStatus``)."""
        if isinstance(n_next, bool) or not isinstance(n_next, int) or not 1 <= n_next <= 100:
            raise ValueError(f"n_next must be a whole number from 1 to 100, not {n_next!r}")
        return await schedule_statuses(self, n_next)

    def schedule_statuses(self, n_next: int = 3) -> list[ScheduleStatus]:
        """Blocking ``aschedule_statuses``.

        >>> app = App("memory://")
        >>> @app.periodic(cron="0 2 * * *", name="nightly")
        ... @app.task()
        ... def report() -> None: ...
        >>> (status,) = app.schedule_statuses(n_next=2)
        >>> status.schedule.name, len(status.next_ticks), status.last_tick, status.last_state
        ('nightly', 2, None, None)
        >>> app.close()
        """
        return self.run_sync(self.aschedule_statuses(n_next))

    async def aretry_jobs(
        self,
        ids: Iterable[str] | None = None,
        *,
        queue: str | None = None,
        task: str | None = None,
    ) -> list[str]:
        """``AdminAPI.aretry_jobs``; and a failed workflow whose failed steps are all retried
        runs again: each retried step, once it succeeds, releases what comes after it
        (``taskmill.workflows.resume``, docs/workflows.md)."""
        retried = await super().aretry_jobs(ids, queue=queue, task=task)
        await resume(self.client, retried)
        return retried

    async def aget_workflow(self, workflow_id: str) -> WorkflowStatus:
        """A workflow: its state, times, and each step's task, job id, state and parents;
        ``JobNotFoundError`` if there is no such workflow (or it was pruned)."""
        return await workflow_status(self.client, workflow_id)

    def get_workflow(self, workflow_id: str) -> WorkflowStatus:
        """Blocking ``aget_workflow``.

        >>> from taskmill import chain
        >>> app = App("memory://")
        >>> @app.task()
        ... def double(x: int) -> int:
        ...     return 2 * x
        >>> flow = chain(double.s(1), double.s()).send()
        >>> [(s.name, s.state, s.parents) for s in app.get_workflow(flow.id).steps]
        [('0', <JobState.QUEUED: 'queued'>, []), ('1', None, ['0'])]
        >>> app.close()
        """
        return self.run_sync(self.aget_workflow(workflow_id))

    async def alist_workflows(self, limit: int = 50) -> list[WorkflowStatus]:
        """The running workflows, oldest first, at most ``limit`` (1 to 1,000), with their
        steps. Ended workflows are not listed (no broker indexes them all: Redis keeps an
        ended workflow only as a record that expires); look one up by id."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise ValueError(f"limit must be a whole number from 1 to 1000, not {limit!r}")
        return await running_workflow_statuses(self.client, limit)

    def list_workflows(self, limit: int = 50) -> list[WorkflowStatus]:
        """Blocking ``alist_workflows``."""
        return self.run_sync(self.alist_workflows(limit))

    # --- a worker inside this program (docs/embedding.md) --------------------------------------

    def worker(
        self, *, queues: Sequence[str] | None = None, concurrency: int = 16, **options: Any
    ) -> EmbeddedWorker:
        """``async with app.worker(...) as w:`` runs a worker on the current event loop
        until the block exits (then it drains). ``queues`` defaults to ``app.queues()``, as
        ``taskmill worker`` does; ``options`` are ``Worker``'s (``pool``, ``name``,
        ``drain_timeout_s``, ``max_start_wait_s``, ``scheduler``, …). See
        ``taskmill.worker.embed``."""
        from taskmill.worker.embed import EmbeddedWorker

        return EmbeddedWorker(self, queues=queues, concurrency=concurrency, **options)

    def worker_thread(
        self, *, queues: Sequence[str] | None = None, concurrency: int = 16, **options: Any
    ) -> WorkerThread:
        """``with app.worker_thread(...) as w:`` (or ``.start()`` and later ``.stop()``) runs
        a worker on a thread of its own; arguments as for ``worker``. See
        ``taskmill.worker.embed``."""
        from taskmill.worker.embed import WorkerThread

        return WorkerThread(self, queues=queues, concurrency=concurrency, **options)

    # --- in-process running (tests, eager mode) -----------------------------------------------

    async def arun_until_idle(self, queues: Sequence[str] | None = None) -> int:
        """Run jobs in this process until none is due and none is running; how many ran."""
        from taskmill.worker import Worker

        worker = Worker(self, queues=queues or self.queues(), concurrency=8, register=False)
        return await worker.run(until_idle=True)

    def run_until_idle(self, queues: Sequence[str] | None = None) -> int:
        """Blocking ``arun_until_idle`` (on a helper thread if this thread runs a loop)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            loop_running = False
        else:
            loop_running = True
        if not loop_running:  # outside the except: errors of jobs are not chained to it
            return asyncio.run(self.arun_until_idle(queues))
        box: list[int] = []
        errors: list[BaseException] = []

        def target() -> None:
            try:
                box.append(asyncio.run(self.arun_until_idle(queues)))
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=target, name="taskmill-run-until-idle")
        thread.start()
        thread.join()
        if errors:
            raise errors[0]
        return box[0]


def _unregistered(*args: Any, **kwargs: Any) -> Any:
    """Stands in for a task this process does not have: any arguments bind."""
    raise UnknownTaskError("this task is not registered in this process")


def _eager_flag(url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme != "memory":
        return False
    value = dict(parse_qsl(parts.query)).get("eager", "")
    return value.lower() in {"1", "true", "yes"}


__all__ = ["App", "Task", "TaskDecorator"]
