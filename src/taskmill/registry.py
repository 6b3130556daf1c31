"""What an app declares: its tasks, periodic schedules, queue options and hooks. No I/O.

A ``Registry`` is plain data that every layer may read: the client takes the hooks and queue
options of the jobs it enqueues from it, a worker the task a job names, the scheduler the
schedules. ``App`` fills one through its decorators (``@app.task``, ``@app.periodic``,
``app.configure_queue``, ``@app.on_enqueue``...).

A ``TaskDefinition`` is what is registered: the function, its options and how a call of it
becomes a stored job (``build``). ``taskmill.task.Task``, what ``@app.task`` returns, adds the
ways to send it.

    >>> from taskmill.retry import Backoff, RetryPolicy
    >>> def add(a: int, b: int) -> int:
    ...     return a + b
    >>> registry = Registry()
    >>> task = registry.add_task(
    ...     TaskDefinition(add, name="add", defaults=SendOptions(queue="math"),
    ...                    policy=RetryPolicy(backoff=Backoff()), max_payload_bytes=1024)
    ... )
    >>> registry.get_task("add") is task, registry.queues("default")
    (True, ['default', 'math'])
    >>> job = task.build(task.defaults, (1, 2), {})
    >>> job.task, job.queue, job.payload
    ('add', 'math', b'[[1,2],{}]')
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from taskmill._ids import uuid7
from taskmill.brokers.base import OnConflict
from taskmill.conversion import TaskTypes
from taskmill.errors import ConfigurationError, UnknownTaskError
from taskmill.hooks import Hook, HookName, Hooks, Instrumentation
from taskmill.job import Job, Meta, NewJob
from taskmill.limits import SPACING, Limit, QueueOptions, WhenFull, queue_options
from taskmill.names import check_name
from taskmill.retry import RetryPolicy
from taskmill.schedules import Schedule
from taskmill.serialization import encode_payload

KeyFunc = Callable[..., str]

__all__ = ["KeyFunc", "Registry", "SendOptions", "TaskDefinition"]


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


class TaskDefinition:
    """A registered function with its options: what a worker runs and what a job names."""

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        name: str,
        defaults: SendOptions,
        policy: RetryPolicy,
        max_payload_bytes: int,
    ) -> None:
        self.fn = fn
        self.name = name
        self.defaults = defaults
        self.policy = policy
        self.max_payload_bytes = max_payload_bytes
        """The largest JSON of a call's arguments ``build`` accepts (the app's setting)."""
        self.signature = inspect.signature(fn)
        self.is_async = inspect.iscoroutinefunction(fn)
        self.accepts_failures = False
        """As a chord's callback: runs even if members failed (their errors in its input)."""
        self.rate_interval_s: float | None = None
        """Seconds between two starts of this task across all workers (``rate_limit``)."""
        self.concurrency: Limit | None = None
        """How many jobs of this task may run at once across all workers (per key)."""
        self.hooks = Hooks()
        """This task's own hooks; they run before the app's."""
        self._bound_shapes: set[object] = set()
        self._types: TaskTypes | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} queue={self.defaults.queue!r}>"

    @property
    def types(self) -> TaskTypes:
        """The types the function declares, and the decoding of stored arguments and results
        to them (``taskmill.conversion``). Read from the annotations at first use, not at
        decoration: names a module defines after the task resolve."""
        types = self._types
        if types is None:
            types = self._types = TaskTypes(self.name, self.fn, self.signature)
        return types

    def bind_check(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        """A ``TypeError`` naming the task if the arguments do not bind to the function."""
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
        payload = encode_payload(self.name, args, kwargs, self.max_payload_bytes, options)
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


class Registry:
    """Tasks by name, periodic schedules by name, options by queue, the app-wide hooks and
    the instrumentations."""

    def __init__(self) -> None:
        self.tasks: dict[str, TaskDefinition] = {}
        self.schedules: dict[str, Schedule] = {}
        self.queue_options: dict[str, QueueOptions] = {}
        self.hooks = Hooks()
        self.instrumentations: list[Instrumentation] = []
        """Wrapping every send and every run, in order (``taskmill.hooks.Instrumentation``)."""

    def __repr__(self) -> str:
        return f"<Registry tasks={len(self.tasks)} schedules={len(self.schedules)}>"

    def add_task(self, task: TaskDefinition) -> TaskDefinition:
        """Register ``task`` under its name; another function under the same name is an
        error (the same one again replaces it: a module imported twice), and so is a name
        ``taskmill.names`` does not allow."""
        check_name("task", task.name)
        check_name("queue", task.defaults.queue)
        known = self.tasks.get(task.name)
        if known is not None and known.fn is not task.fn:
            raise ConfigurationError(f"two tasks are named {task.name!r}; give one a name=")
        self.tasks[task.name] = task
        return task

    def add_schedule(self, schedule: Schedule) -> None:
        check_name("schedule", schedule.name)
        if schedule.name in self.schedules:
            raise ConfigurationError(f"two schedules are named {schedule.name!r}; give one a name=")
        self.schedules[schedule.name] = schedule

    def configure_queue(
        self,
        name: str,
        *,
        rate_limit: str | None = None,
        max_depth: int | None = None,
        when_full: WhenFull = "raise",
        full_timeout_s: float = 30.0,
    ) -> None:
        """Limits of a queue (see ``App.configure_queue``)."""
        check_name("queue", name)
        self.queue_options[name] = queue_options(
            rate_limit=rate_limit,
            max_depth=max_depth,
            when_full=when_full,
            full_timeout_s=full_timeout_s,
        )

    def get_task(self, name: str) -> TaskDefinition:
        """The task registered under ``name``; ``UnknownTaskError`` listing the known names."""
        try:
            return self.tasks[name]
        except KeyError:
            known = ", ".join(sorted(self.tasks)) or "none"
            raise UnknownTaskError(
                f"no task named {name!r} is registered in this app (known: {known})"
            ) from None

    def queues(self, default_queue: str) -> list[str]:
        """Every queue a registered task sends to by default, and ``default_queue``."""
        return sorted({t.defaults.queue for t in self.tasks.values()} | {default_queue})

    def hook_lists(self, task: TaskDefinition | None, name: HookName) -> list[list[Hook]]:
        """A task's hooks for an event, then the app's (the documented order)."""
        return [task.hooks.get(name) if task is not None else [], self.hooks.get(name)]

    def rate_buckets(self, task: TaskDefinition | None, job: Job) -> list[tuple[str, float]]:
        """The rate limits a job is under: its task's and its queue's, as (bucket, interval)
        with the spacing of ``taskmill.limits``."""
        buckets = []
        if task is not None and task.rate_interval_s is not None:
            buckets.append((f"task:{task.name}", task.rate_interval_s * SPACING))
        options = self.queue_options.get(job.queue)
        if options is not None and options.rate_interval_s is not None:
            buckets.append((f"queue:{job.queue}", options.rate_interval_s * SPACING))
        return buckets
