"""Hooks: functions called at points of a job's life, app-wide or for one task.

``on_enqueue(job)`` in the producer once the broker stored the job (``job`` is the ``NewJob``
that was stored; a send that matched a pending key or a stored id stored nothing and calls
nothing). In the worker: ``on_start(job)`` just before the function runs, then one of
``on_success(job, result)``, ``on_failure(job, error)`` (no attempt left, or not retryable;
``error`` is an ``ErrorInfo``) and ``on_retry(job, error, delay)`` (``delay``: the seconds
chosen by ``Retry(delay=)`` or the back-off, not what is left of them when the hook runs).
A cancelled job, or one handed back at shutdown, calls none of the three.

In the worker, ``job`` is a ``JobView``: the ``Job`` record as claimed (state ``running``),
read-only, every field readable as before (``job.id``, ``job.attempt``, ``job.payload``...),
plus what the run knows: ``args`` and ``kwargs`` decoded as the function receives them (to
its annotations' types), ``duration_s`` (the run's monotonic seconds, in the outcome hooks)
and ``result`` (in ``on_success``, decoded as ``JobHandle.result()`` returns it; the same
value as the hook's ``result`` argument).

For each event the task's hooks run first, then the app's, each list in the order it was
registered. Hooks may be sync or async; in the worker a sync hook runs in a thread so it
cannot block the event loop. A hook that raises is logged with the job's id and skipped: it
never changes the job's outcome, and the hooks after it still run.

    >>> from taskmill import App
    >>> app = App("memory://")
    >>> seen = []
    >>> @app.on_success
    ... def audit(job, result):
    ...     seen.append((job.task.rsplit(".", 1)[-1], job.args, result))
    >>> @app.task(on_success=lambda job, result: seen.append(("task hook", result)))
    ... def add(a: int, b: int) -> int:
    ...     return a + b
    >>> _ = add.send(1, 2)
    >>> app.run_until_idle()
    1
    >>> seen
    [('task hook', 3), ('add', (1, 2), 3)]

Instrumentation (``app.add_instrumentation``) is the other seam: where a hook is told of a
moment, an instrumentation wraps it. Its ``sending(jobs)`` is a context manager around the
broker write of each enqueue, which may hand back copies of the jobs with keys added to their
metadata (a trace context stored with the job); its ``running(job)`` one around the call of a
job's function in the worker, entered in the context the function runs in (so what it makes
current, the function sees) and left with the function's exception, if any. An app without
instrumentation pays one truth test per send and per run. ``taskmill.integrations.otel`` is
one.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from taskmill.errors import ConfigurationError, SerializationError
from taskmill.meta import check_meta
from taskmill.portal import DaemonThreads
from taskmill.serialization import decode_payload

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from taskmill.context import JobContext
    from taskmill.job import Job, Meta, NewJob

log = logging.getLogger("taskmill.hooks")

HookName = Literal["on_enqueue", "on_start", "on_success", "on_failure", "on_retry"]
HOOK_NAMES: tuple[HookName, ...] = (
    "on_enqueue",
    "on_start",
    "on_success",
    "on_failure",
    "on_retry",
)
Hook = Callable[..., Any]


@dataclass
class Hooks:
    """The hooks of an app or of a task, by event."""

    on_enqueue: list[Hook] = field(default_factory=list)
    on_start: list[Hook] = field(default_factory=list)
    on_success: list[Hook] = field(default_factory=list)
    on_failure: list[Hook] = field(default_factory=list)
    on_retry: list[Hook] = field(default_factory=list)

    def add(self, name: HookName, hooks: Hook | Iterable[Hook] | None) -> None:
        if hooks is None:
            return
        for hook in [hooks] if callable(hooks) else list(hooks):
            if not callable(hook):
                raise TypeError(f"{name} hooks must be callables, not {hook!r}")
            getattr(self, name).append(hook)

    def get(self, name: HookName) -> list[Hook]:
        hooks: list[Hook] = getattr(self, name)
        return hooks

    def __bool__(self) -> bool:
        return any(getattr(self, name) for name in HOOK_NAMES)


class JobView:
    """The ``job`` a worker's hooks receive: the stored ``Job`` record as claimed, read-only
    (each of its fields reads through: ``id``, ``task``, ``attempt``, ``payload``...), plus:

    - ``args`` (tuple) and ``kwargs`` (read-only mapping): the arguments as the function
      receives them, decoded to its annotations' types. If they could not be decoded (the
      job then fails, and ``error`` says why), the JSON values stored, or empty if the
      payload is not an ``[args, kwargs]`` pair.
    - ``duration_s``: the run's duration in seconds (monotonic clock), from just before the
      function is called (after ``on_start``) to its outcome, in ``on_success``,
      ``on_retry`` and ``on_failure``; None in ``on_start``, and when the job failed before
      its function was called (arguments that cannot be decoded).
    - ``result``: in ``on_success``, the result as ``JobHandle.result()`` returns it (the
      record's raw ``result`` bytes are None while the job runs); else None.
    - ``record``: the ``Job`` itself.
    """

    __slots__ = ("_job", "args", "duration_s", "kwargs", "result")

    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]
    duration_s: float | None
    result: Any

    def __init__(
        self,
        job: Job,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        *,
        duration_s: float | None = None,
        result: Any = None,
    ) -> None:
        set_ = object.__setattr__
        set_(self, "_job", job)
        set_(self, "args", args)
        set_(self, "kwargs", kwargs)
        set_(self, "duration_s", duration_s)
        set_(self, "result", result)

    @classmethod
    def of(
        cls, job: Job, ctx: JobContext, *, duration_s: float | None = None, result: Any = None
    ) -> JobView:
        """The view of a running job, with the arguments its run decoded (see the class)."""
        if ctx._arguments is not None:
            args, kwargs = ctx.args, ctx.kwargs
        else:
            try:
                json_args, json_kwargs = decode_payload(job.payload)
                args, kwargs = tuple(json_args), MappingProxyType(json_kwargs)
            except SerializationError:
                args, kwargs = (), MappingProxyType({})
        return cls(job, args, kwargs, duration_s=duration_s, result=result)

    @property
    def record(self) -> Job:
        job: Job = object.__getattribute__(self, "_job")
        return job

    def __getattr__(self, name: str) -> Any:
        if name == "_job":  # not set (a half-made copy): no endless recursion
            raise AttributeError(name)
        return getattr(self._job, name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"a hook's job is read-only (setting {name!r})")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"a hook's job is read-only (deleting {name!r})")

    def __repr__(self) -> str:
        # no arguments: they may be private, and reprs end up in logs
        job = self._job
        return f"<JobView {job.id} {job.task} attempt={job.attempt}>"


def _report(hook: Hook, name: str, job_id: str, task: str) -> None:
    log.exception(
        "%s hook %s raised for job %s (%s); the job's outcome is unchanged",
        name,
        getattr(hook, "__qualname__", repr(hook)),
        job_id,
        task,
    )


async def arun_hooks(
    lists: Iterable[list[Hook]],
    name: str,
    job_id: str,
    task: str,
    *args: Any,
    threads: DaemonThreads | None = None,
) -> None:
    """Call every hook of ``lists`` in order, on the running loop: async ones awaited, sync
    ones in a thread (one of ``threads``, which work at interpreter exit too: a worker's;
    else the loop's default executor). Errors are logged, never raised."""
    for hooks in lists:
        for hook in hooks:
            try:
                if inspect.iscoroutinefunction(hook):
                    await hook(*args)
                else:
                    if threads is None:
                        result = await asyncio.to_thread(hook, *args)
                    else:
                        result = await threads.run(contextvars.copy_context().run, hook, *args)
                    if inspect.isawaitable(result):
                        await result
            except Exception:
                _report(hook, name, job_id, task)


def run_hooks_blocking(
    lists: Iterable[list[Hook]],
    name: str,
    job_id: str,
    task: str,
    *args: Any,
    run_async: Callable[[Any], Any],
) -> None:
    """The producer's blocking side: sync hooks called here, async ones by ``run_async``."""
    for hooks in lists:
        for hook in hooks:
            try:
                result = hook(*args)
                if inspect.isawaitable(result):
                    run_async(result)
            except Exception:
                _report(hook, name, job_id, task)


# --- instrumentation: context managers around the send and the run ---------------------------


class Instrumentation(Protocol):
    """What ``app.add_instrumentation`` takes: two context managers around the moments a
    tracer (or a profiler, or a log context) needs to wrap.

    ``sending(jobs)`` is entered in the process that enqueues, on the caller's thread (or task)
    and in its context, just before the broker stores ``jobs`` (those of one send, one
    ``send_many``, one periodic tick or one workflow's released steps), and left once the
    broker answered, with its error if it raised. It yields the jobs to store: ``jobs`` itself,
    or copies (``msgspec.structs.replace``) whose ``meta`` has keys added; nothing else may
    change. What it adds is checked as metadata (``taskmill.meta``), stored with the job on
    every broker, kept across retries, and read back as ``job.meta`` in ``running``.

    ``running(job)`` is entered in the worker just before the function of ``job`` (the ``Job``
    as claimed) is called and left when it returned or raised, with its exception (a time
    limit's and an interrupt's too), in the job's own asyncio task: a context variable it sets
    is seen by an async function and by a sync one in the thread pool or ``--pool async``.
    A function in a ``--pool process`` child runs in another process: it sees that context
    only through an instrumentation that is also a ``CarriedInstrumentation``.

    Instrumentations run in the order they were added; each ``sending`` gets the jobs the
    previous one yielded. Unlike a hook's, an instrumentation's error is not swallowed: it is
    the send's (or the run's) error.
    """

    def sending(self, jobs: Sequence[NewJob]) -> AbstractContextManager[Sequence[NewJob]]: ...

    def running(self, job: Job) -> AbstractContextManager[object]: ...


@runtime_checkable
class CarriedInstrumentation(Instrumentation, Protocol):
    """An instrumentation whose context reaches a function run in a ``--pool process``
    child. In the worker, inside ``running``, ``carry()`` gives what the child needs of the
    current context, as metadata (a trace context: the worker's span); the child, which
    imported the app and so has the same instrumentations, enters ``carried(meta)`` around
    the function, with what every instrumentation of the app carried (each reads its own
    keys). ``running`` itself is not entered in the child: the worker's wraps the run."""

    def carry(self) -> Meta: ...

    def carried(self, meta: Meta) -> AbstractContextManager[object]: ...


def carry(instrumentations: Sequence[Instrumentation]) -> Meta:
    """What the ``CarriedInstrumentation``s carry to a child, merged (empty: none is)."""
    carried: Meta = {}
    for instrumentation in instrumentations:
        if isinstance(instrumentation, CarriedInstrumentation):
            carried.update(instrumentation.carry())
    return carried


@contextlib.contextmanager
def carried_context(instrumentations: Sequence[Instrumentation], meta: Meta) -> Iterator[None]:
    """In a child process: every ``CarriedInstrumentation``'s ``carried`` around the call."""
    with contextlib.ExitStack() as stack:
        for instrumentation in instrumentations:
            if isinstance(instrumentation, CarriedInstrumentation):
                stack.enter_context(instrumentation.carried(meta))
        yield


@contextlib.contextmanager
def instrumented_send(
    instrumentations: Sequence[Instrumentation], jobs: Sequence[NewJob]
) -> Iterator[Sequence[NewJob]]:
    """Every instrumentation's ``sending`` around the broker write; the jobs to store."""
    with contextlib.ExitStack() as stack:
        for instrumentation in instrumentations:
            given = jobs
            jobs = stack.enter_context(instrumentation.sending(jobs))
            if jobs is not given:
                _check_sent(instrumentation, given, jobs)
        yield jobs


def _check_sent(
    instrumentation: Instrumentation, given: Sequence[NewJob], jobs: Sequence[NewJob]
) -> None:
    if [j.id for j in jobs] != [j.id for j in given]:
        raise ConfigurationError(
            f"instrumentation {instrumentation!r} changed which jobs are sent: its sending() "
            "must yield the jobs it was given, or copies of them in the same order"
        )
    for job in jobs:
        check_meta(job.meta, what=f"meta of job {job.id} as {instrumentation!r} left it")


@contextlib.contextmanager
def instrumented_run(instrumentations: Sequence[Instrumentation], job: Job) -> Iterator[None]:
    """Every instrumentation's ``running`` around the call of a job's function."""
    with contextlib.ExitStack() as stack:
        for instrumentation in instrumentations:
            stack.enter_context(instrumentation.running(job))
        yield
