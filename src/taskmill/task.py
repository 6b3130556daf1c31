"""The decorator's product: a task with options, and the ways to send it."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, Literal, ParamSpec, TypeVar

from taskmill.brokers.base import EnqueueResult, OnConflict
from taskmill.errors import ConfigurationError
from taskmill.handle import JobHandle
from taskmill.job import NewJob
from taskmill.meta import check_meta
from taskmill.names import check_name
from taskmill.registry import KeyFunc, SendOptions, TaskDefinition
from taskmill.retry import RetryPolicy
from taskmill.workflows import Signature

if TYPE_CHECKING:
    from taskmill.client import Client

P = ParamSpec("P")
R = TypeVar("R")

Seconds = float | timedelta

__all__ = ["BoundTask", "KeyFunc", "Seconds", "SendOptions", "Task"]


def seconds(value: Seconds | None, what: str) -> float | None:
    if value is None:
        return None
    s = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if s < 0 or math.isnan(s):
        raise ConfigurationError(f"{what} must be a non-negative number of seconds, not {value!r}")
    return s


def check_time_limits(soft_s: float | None, hard_s: float | None, task: str = "") -> None:
    """``soft_timeout`` and ``timeout``: above 0 when given, the soft one before the hard one
    (at or past it, the hard limit would always come first and the soft one never fire)."""
    of = f"task {task!r}: " if task else ""
    for what, limit in (("soft_timeout", soft_s), ("timeout", hard_s)):
        if limit is not None and not limit > 0:
            raise ConfigurationError(f"{of}{what} must be more than 0 seconds, not {limit:g}")
    if soft_s is not None and hard_s is not None and soft_s >= hard_s:
        raise ConfigurationError(
            f"{of}soft_timeout ({soft_s:g} s) must be less than timeout ({hard_s:g} s): the "
            "soft limit warns the task before the hard one stops it"
        )


def timeout_seconds(value: Seconds | None) -> float | None:
    """A time limit: more than 0 s (0 would fail every attempt the moment it starts)."""
    s = seconds(value, "timeout")
    if s == 0:
        raise ConfigurationError(
            f"timeout must be more than 0 seconds, not {value!r} (leave it out for no limit)"
        )
    return s


MAX_PRIORITY = 1000

PriorityName = Literal["urgent", "high", "normal", "low"]
Priority = int | PriorityName
PRIORITIES: dict[str, int] = {"urgent": 100, "high": 50, "normal": 0, "low": -50}
"""Named priorities. ``normal`` is the default (0); the others are 50 apart, which leaves
numbers in between for a task that must come between two names (``75``: after urgent, before
high), and room up to ±1000 beyond them. ``low`` is below the default, so work sent without a
priority goes before it."""


def check_priority(priority: Priority | str) -> int:
    """Priorities are whole numbers from -1000 to 1000 (higher runs first), on every broker,
    or a name of ``PRIORITIES``.

    >>> check_priority("urgent"), check_priority(-5)
    (100, -5)
    """
    if isinstance(priority, str):
        try:
            return PRIORITIES[priority]
        except KeyError:
            names = ", ".join(f"{name} ({value})" for name, value in PRIORITIES.items())
            raise ConfigurationError(
                f"unknown priority {priority!r}: use a whole number from {-MAX_PRIORITY} to "
                f"{MAX_PRIORITY} or one of {names}"
            ) from None
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ConfigurationError(f"priority must be a whole number or a name, not {priority!r}")
    if not -MAX_PRIORITY <= priority <= MAX_PRIORITY:
        raise ConfigurationError(
            f"priority must be between {-MAX_PRIORITY} and {MAX_PRIORITY}, not {priority}"
        )
    return priority


class Task(TaskDefinition, Generic[P, R]):
    """A function registered with an app. Call it to run it here; ``send`` it to run it in a
    worker.

    >>> from taskmill import App
    >>> app = App("memory://")
    >>> @app.task(retries=2)
    ... def add(a: int, b: int) -> int:
    ...     return a + b
    >>> add(1, 2)
    3
    >>> add.name
    'taskmill.task.add'
    """

    def __init__(
        self,
        client: Client,
        fn: Callable[P, Any],
        *,
        name: str,
        defaults: SendOptions,
        policy: RetryPolicy,
    ) -> None:
        limit = client.settings.max_payload_bytes
        super().__init__(fn, name=name, defaults=defaults, policy=policy, max_payload_bytes=limit)
        self.client = client
        """Where ``send`` enqueues: the client of the app that registered the task."""
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Any:
        return self.fn(*args, **kwargs)

    # --- sending ----------------------------------------------------------------------------

    def options(
        self,
        *,
        queue: str | None = None,
        priority: Priority | None = None,
        delay: Seconds | None = None,
        run_at: datetime | float | None = None,
        key: str | None = None,
        on_conflict: OnConflict | None = None,
        retries: int | None = None,
        timeout: Seconds | None = None,
        soft_timeout: Seconds | None = None,
        connection: Any = None,
        job_id: str | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> BoundTask[P, R]:
        """The same task with some send options changed.

        ``priority``: a whole number from -1000 to 1000 (higher runs first) or a name:
        ``"urgent"`` (100), ``"high"`` (50), ``"normal"`` (0), ``"low"`` (-50).
        ``timeout``: seconds each attempt may run (more than 0).
        ``timeout`` and ``soft_timeout`` change the job's hard and soft time limits (see
        ``App.task``). A ``soft_timeout`` other than the task's travels inside the stored
        payload, after the arguments (no broker stores a field for it); a worker older than
        this option fails such a job as unreadable.

        ``connection`` enqueues inside the caller's open transaction (brokers that support it):
        the job exists if and only if that transaction commits.

        ``meta`` is stored with the job (``Job.meta``), shown by the CLI, filterable
        (``app.list_jobs(meta=...)``) and seen by hooks: a small JSON object of str keys and
        scalar values, such as ``{"user_id": 42}`` (see ``taskmill.meta``).

        ``job_id`` names the job instead of a fresh id: a send whose id is stored already (in
        any state, until it is pruned) stores nothing and returns that job's handle with
        ``existing`` set, so a send repeated after a crash or a timeout runs once.

        >>> from taskmill import App
        >>> app = App("memory://")
        >>> @app.task()
        ... def charge(order: int) -> None: ...
        >>> first = charge.options(job_id="charge-42").send(42)
        >>> again = charge.options(job_id="charge-42").send(42)
        >>> (again.id, first.existing, again.existing)
        ('charge-42', False, True)
        """
        given = {
            "queue": queue,
            "priority": priority,
            "delay": delay,
            "run_at": run_at,
            "key": key,
            "on_conflict": on_conflict,
            "retries": retries,
            "timeout": timeout,
            "soft_timeout": soft_timeout,
            "connection": connection,
            "job_id": job_id,
            "meta": meta,
        }
        opts = self.defaults
        changes = {
            field: check(value)
            for option, value in given.items()
            if value is not None
            for field, check in (_OPTIONS[option],)
        }
        if "timeout_s" in changes or "soft_timeout_s" in changes:
            check_time_limits(
                changes.get("soft_timeout_s", opts.soft_timeout_s),
                changes.get("timeout_s", opts.timeout_s),
                self.name,
            )
        return BoundTask(self, replace(opts, **changes) if changes else opts)

    def send(self, *args: P.args, **kwargs: P.kwargs) -> JobHandle[R]:
        """Enqueue one job and return its handle at once."""
        return BoundTask(self, self.defaults).send(*args, **kwargs)

    async def asend(self, *args: P.args, **kwargs: P.kwargs) -> JobHandle[R]:
        return await BoundTask(self, self.defaults).asend(*args, **kwargs)

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        """A call of this task to make later, in a workflow (``chain``, ``group``, ``chord``):
        the result of what comes before it is prepended to ``args``."""
        return Signature(self.name, args, kwargs, self.accepts_failures, client=self.client)

    def send_many(
        self, calls: Iterable[Sequence[Any] | Mapping[str, Any]], *, connection: Any = None
    ) -> list[JobHandle[R]]:
        """Enqueue many jobs in one broker call. Each item is a tuple of positional arguments
        or a mapping of keyword arguments.

        >>> from taskmill import App
        >>> app = App("memory://")
        >>> @app.task()
        ... def add(a: int, b: int) -> int:
        ...     return a + b
        >>> len(add.send_many([(1, 2), {"a": 3, "b": 4}]))
        2
        """
        return self.options(connection=connection).send_many(calls)

    async def asend_many(
        self, calls: Iterable[Sequence[Any] | Mapping[str, Any]]
    ) -> list[JobHandle[R]]:
        return await BoundTask(self, self.defaults).asend_many(calls)


class BoundTask(Generic[P, R]):
    """A task with its send options fixed: what ``Task.options(...)`` returns."""

    __slots__ = ("opts", "task")

    def __init__(self, task: Task[P, R], opts: SendOptions) -> None:
        self.task = task
        self.opts = opts

    def _build(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> NewJob:
        return self.task.build(self.opts, args, kwargs, check_types=True)

    def _jobs(self, calls: Iterable[Sequence[Any] | Mapping[str, Any]]) -> list[NewJob]:
        if self.opts.job_id is not None:
            raise ConfigurationError(
                f"task {self.task.name!r}: job_id names one job; send_many would give it to each"
            )
        jobs = []
        for call in calls:
            if isinstance(call, Mapping):
                jobs.append(self._build((), dict(call)))
            elif isinstance(call, Sequence) and not isinstance(call, str | bytes):
                jobs.append(self._build(tuple(call), {}))
            else:
                raise TypeError(
                    f"send_many of task {self.task.name!r} takes tuples of positional arguments "
                    f"or mappings of keyword arguments, not {type(call).__name__}"
                )
        return jobs

    def _handles(self, result: EnqueueResult) -> list[JobHandle[R]]:
        client = self.task.client
        existing = result.existing
        return [JobHandle(client, i, existing=n in existing) for n, i in enumerate(result.ids)]

    def _store(self, jobs: list[NewJob]) -> EnqueueResult:
        client, opts = self.task.client, self.opts
        result = client.enqueue_blocking(
            jobs, self.task, on_conflict=opts.on_conflict, connection=opts.connection
        )
        if client.eager is not None:
            client.eager.run_until_idle()
        return result

    async def _astore(self, jobs: list[NewJob]) -> EnqueueResult:
        client, opts = self.task.client, self.opts
        if opts.connection is not None:
            raise ConfigurationError("connection= is for send(); asend() has no transaction")
        result = await client.enqueue(jobs, self.task, on_conflict=opts.on_conflict)
        if client.eager is not None:
            await client.eager.arun_until_idle()
        return result

    def send(self, *args: P.args, **kwargs: P.kwargs) -> JobHandle[R]:
        result = self._store([self._build(args, kwargs)])
        return JobHandle(self.task.client, result.ids[0], existing=bool(result.existing))

    async def asend(self, *args: P.args, **kwargs: P.kwargs) -> JobHandle[R]:
        result = await self._astore([self._build(args, kwargs)])
        return JobHandle(self.task.client, result.ids[0], existing=bool(result.existing))

    def send_many(self, calls: Iterable[Sequence[Any] | Mapping[str, Any]]) -> list[JobHandle[R]]:
        jobs = self._jobs(calls)
        return self._handles(self._store(jobs)) if jobs else []

    async def asend_many(
        self, calls: Iterable[Sequence[Any] | Mapping[str, Any]]
    ) -> list[JobHandle[R]]:
        jobs = self._jobs(calls)
        return self._handles(await self._astore(jobs)) if jobs else []


def _attempts(retries: int) -> int:
    if retries < 0:
        raise ConfigurationError(f"retries must be >= 0, not {retries}")
    return int(retries) + 1


def _as_given(value: Any) -> Any:
    return value


def _timestamp(run_at: datetime | float) -> float:
    return run_at.timestamp() if isinstance(run_at, datetime) else run_at


def _on_conflict(on_conflict: str) -> str:
    if on_conflict not in ("return", "raise"):
        raise ConfigurationError("on_conflict must be 'return' or 'raise'")
    return on_conflict


def _job_id(job_id: str) -> str:
    if not isinstance(job_id, str) or not job_id or len(job_id) > 200:
        raise ConfigurationError(f"job_id must be a string of 1 to 200 characters: {job_id!r}")
    return job_id


_OPTIONS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "queue": ("queue", lambda value: check_name("queue", value)),
    "priority": ("priority", check_priority),
    "delay": ("delay_s", lambda value: seconds(value, "delay")),
    "run_at": ("run_at", _timestamp),
    "key": ("key", _as_given),
    "on_conflict": ("on_conflict", _on_conflict),
    "retries": ("max_attempts", _attempts),
    "timeout": ("timeout_s", timeout_seconds),
    "soft_timeout": ("soft_timeout_s", lambda value: seconds(value, "soft_timeout")),
    "connection": ("connection", _as_given),
    "job_id": ("job_id", _job_id),
    "meta": ("meta", check_meta),
}
"""Each of ``Task.options``' parameters: the ``SendOptions`` field it sets, and its check."""
