"""The decorator's product: a task with options, and the ways to send it."""

from __future__ import annotations

import inspect
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, Literal, ParamSpec, TypeVar

from taskmill._ids import uuid7
from taskmill.brokers.base import EnqueueResult, OnConflict
from taskmill.conversion import TaskTypes
from taskmill.errors import ConfigurationError
from taskmill.handle import JobHandle
from taskmill.hooks import Hooks
from taskmill.job import Meta, NewJob
from taskmill.meta import check_meta
from taskmill.retry import RetryPolicy
from taskmill.serialization import encode_payload

if TYPE_CHECKING:
    from taskmill.app import App
    from taskmill.flow import Limit
    from taskmill.workflows import Signature

P = ParamSpec("P")
R = TypeVar("R")

KeyFunc = Callable[..., str]
Seconds = float | timedelta


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


@dataclass(frozen=True, slots=True)
class SendOptions:
    """Per-send options; ``Task.options(...)`` makes a copy with some of them changed."""

    queue: str
    priority: int = 0
    delay_s: float = 0.0
    run_at: float | None = None
    key: str | KeyFunc | None = None
    on_conflict: OnConflict = "return"
    max_attempts: int = 1
    timeout_s: float | None = None
    soft_timeout_s: float | None = None
    connection: Any = None
    job_id: str | None = None
    meta: Meta = field(default_factory=dict)


class Task(Generic[P, R]):
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
        app: App,
        fn: Callable[P, Any],
        *,
        name: str,
        defaults: SendOptions,
        policy: RetryPolicy,
    ) -> None:
        self.app = app
        self.fn = fn
        self.name = name
        self.defaults = defaults
        self.policy = policy
        self.signature = inspect.signature(fn)
        self._bound_shapes: set[object] = set()
        self._types: TaskTypes | None = None
        self.is_async = inspect.iscoroutinefunction(fn)
        self.accepts_failures = False
        self.rate_interval_s: float | None = None
        self.concurrency: Limit | None = None
        """How many jobs of this task may run at once across all workers (per key)."""
        self.hooks = Hooks()
        """Seconds between two starts of this task across all workers (``rate_limit``)."""
        """As a chord's callback: runs even if members failed (their errors in its input)."""
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    def __repr__(self) -> str:
        return f"<Task {self.name} queue={self.defaults.queue!r}>"

    @property
    def types(self) -> TaskTypes:
        """The types the function declares, and the decoding of stored arguments and results
        to them (``taskmill.conversion``). Read from the annotations at first use, not at
        decoration: names a module defines after the task resolve."""
        types = self._types
        if types is None:
            types = self._types = TaskTypes(self.name, self.fn, self.signature)
        return types

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
        opts = self.defaults
        changes: dict[str, Any] = {}
        if queue is not None:
            changes["queue"] = queue
        if priority is not None:
            changes["priority"] = check_priority(priority)
        if delay is not None:
            changes["delay_s"] = seconds(delay, "delay")
        if run_at is not None:
            changes["run_at"] = run_at.timestamp() if isinstance(run_at, datetime) else run_at
        if key is not None:
            changes["key"] = key
        if on_conflict is not None:
            if on_conflict not in ("return", "raise"):
                raise ConfigurationError("on_conflict must be 'return' or 'raise'")
            changes["on_conflict"] = on_conflict
        if retries is not None:
            changes["max_attempts"] = _attempts(retries)
        if timeout is not None:
            changes["timeout_s"] = timeout_seconds(timeout)
        if soft_timeout is not None:
            changes["soft_timeout_s"] = seconds(soft_timeout, "soft_timeout")
        if timeout is not None or soft_timeout is not None:
            check_time_limits(
                changes.get("soft_timeout_s", opts.soft_timeout_s),
                changes.get("timeout_s", opts.timeout_s),
                self.name,
            )
        if connection is not None:
            changes["connection"] = connection
        if job_id is not None:
            if not isinstance(job_id, str) or not job_id or len(job_id) > 200:
                raise ConfigurationError(
                    f"job_id must be a string of 1 to 200 characters: {job_id!r}"
                )
            changes["job_id"] = job_id
        if meta is not None:
            changes["meta"] = check_meta(meta)
        return BoundTask(self, replace(opts, **changes) if changes else opts)

    def send(self, *args: P.args, **kwargs: P.kwargs) -> JobHandle[R]:
        """Enqueue one job and return its handle at once."""
        return BoundTask(self, self.defaults).send(*args, **kwargs)

    async def asend(self, *args: P.args, **kwargs: P.kwargs) -> JobHandle[R]:
        return await BoundTask(self, self.defaults).asend(*args, **kwargs)

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        """A call of this task to make later, in a workflow (``chain``, ``group``, ``chord``):
        the result of what comes before it is prepended to ``args``."""
        from taskmill.workflows import Signature

        return Signature(self.name, args, kwargs, self.accepts_failures, app=self.app)

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

    # --- building jobs ----------------------------------------------------------------------

    def bind_check(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        # Whether a call binds depends only on how many positional arguments there are and
        # which keywords: remember the shapes that bound, so send_many checks each shape once.
        shape = (len(args), frozenset(kwargs)) if kwargs else len(args)
        if shape in self._bound_shapes:
            return
        try:
            self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"task {self.name!r}: {exc}") from None
        if len(self._bound_shapes) < 64:
            self._bound_shapes.add(shape)

    def build(
        self,
        opts: SendOptions,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        check_types: bool = False,
    ) -> NewJob:
        """The job to store for a call. ``check_types`` (what ``send`` does): an argument whose
        JSON form would not decode to its annotation in the worker is a ``SerializationError``
        now, rather than a failed job later (one decode of the payload, only for tasks with
        annotations to convert)."""
        self.bind_check(args, kwargs)
        key = opts.key
        if key is not None and not isinstance(key, str):
            key = key(*args, **kwargs)
        # The worker takes the soft limit from its own registration of the task; only a send
        # that changes it stores it, with the arguments.
        soft = opts.soft_timeout_s
        options = {"soft_timeout_s": soft} if soft != self.defaults.soft_timeout_s else None
        payload = encode_payload(
            self.name, args, kwargs, self.app.settings.max_payload_bytes, options
        )
        if check_types:
            types = self._types or self.types
            if not types.plain:
                types.check(payload, len(args), kwargs)
        return NewJob(
            id=opts.job_id or uuid7(),
            task=self.name,
            queue=opts.queue,
            payload=payload,
            priority=opts.priority,
            run_at=opts.run_at,
            delay_s=opts.delay_s,
            max_attempts=opts.max_attempts,
            timeout_s=opts.timeout_s,
            key=key,
            meta=opts.meta,
        )


class BoundTask(Generic[P, R]):
    """A task with its send options fixed: what ``Task.options(...)`` returns."""

    __slots__ = ("opts", "task")

    def __init__(self, task: Task[P, R], opts: SendOptions) -> None:
        self.task = task
        self.opts = opts

    def _jobs(self, calls: Iterable[Sequence[Any] | Mapping[str, Any]]) -> list[NewJob]:
        if self.opts.job_id is not None:
            raise ConfigurationError(
                f"task {self.task.name!r}: job_id names one job; send_many would give it to each"
            )
        jobs = []
        for call in calls:
            if isinstance(call, Mapping):
                jobs.append(self.task.build(self.opts, (), dict(call), check_types=True))
            elif isinstance(call, Sequence) and not isinstance(call, str | bytes):
                jobs.append(self.task.build(self.opts, tuple(call), {}, check_types=True))
            else:
                raise TypeError(
                    f"send_many of task {self.task.name!r} takes tuples of positional arguments "
                    f"or mappings of keyword arguments, not {type(call).__name__}"
                )
        return jobs

    def _handles(self, result: EnqueueResult) -> list[JobHandle[R]]:
        app = self.task.app
        return [JobHandle(app, i, existing=n in result.existing) for n, i in enumerate(result.ids)]

    def send(self, *args: P.args, **kwargs: P.kwargs) -> JobHandle[R]:
        job = self.task.build(self.opts, args, kwargs, check_types=True)
        result = self.task.app.enqueue_sync([job], self.opts)
        return JobHandle(self.task.app, result.ids[0], existing=bool(result.existing))

    async def asend(self, *args: P.args, **kwargs: P.kwargs) -> JobHandle[R]:
        job = self.task.build(self.opts, args, kwargs, check_types=True)
        result = await self.task.app.enqueue_async([job], self.opts)
        return JobHandle(self.task.app, result.ids[0], existing=bool(result.existing))

    def send_many(self, calls: Iterable[Sequence[Any] | Mapping[str, Any]]) -> list[JobHandle[R]]:
        jobs = self._jobs(calls)
        return self._handles(self.task.app.enqueue_sync(jobs, self.opts)) if jobs else []

    async def asend_many(
        self, calls: Iterable[Sequence[Any] | Mapping[str, Any]]
    ) -> list[JobHandle[R]]:
        jobs = self._jobs(calls)
        return self._handles(await self.task.app.enqueue_async(jobs, self.opts)) if jobs else []


def _attempts(retries: int) -> int:
    if retries < 0:
        raise ConfigurationError(f"retries must be >= 0, not {retries}")
    return int(retries) + 1


TaskFunction = Callable[P, Awaitable[R]] | Callable[P, R]
