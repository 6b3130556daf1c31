"""Hooks: functions called at points of a job's life, app-wide or for one task.

``on_enqueue(job)`` in the producer once the broker stored the job (``job`` is the ``NewJob``
that was stored; a send that matched a pending key or a stored id stored nothing and calls
nothing). In the worker: ``on_start(job)`` just before the function runs, then one of
``on_success(job, result)``, ``on_failure(job, error)`` (no attempt left, or not retryable;
``error`` is an ``ErrorInfo``) and ``on_retry(job, error, delay)`` (``delay`` in seconds).
A cancelled job, or one handed back at shutdown, calls none of the three. ``job`` is the
``Job`` as claimed (state ``running``).

For each event the task's hooks run first, then the app's, each list in the order it was
registered. Hooks may be sync or async; in the worker a sync hook runs in a thread so it
cannot block the event loop. A hook that raises is logged with the job's id and skipped: it
never changes the job's outcome, and the hooks after it still run.

    >>> from taskmill import App
    >>> app = App("memory://")
    >>> seen = []
    >>> @app.on_success
    ... def audit(job, result):
    ...     seen.append((job.task.rsplit(".", 1)[-1], result))
    >>> @app.task(on_success=lambda job, result: seen.append(("task hook", result)))
    ... def add(a: int, b: int) -> int:
    ...     return a + b
    >>> _ = add.send(1, 2)
    >>> app.run_until_idle()
    1
    >>> seen
    [('task hook', 3), ('add', 3)]
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

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


def _report(hook: Hook, name: str, job_id: str, task: str) -> None:
    log.exception(
        "%s hook %s raised for job %s (%s); the job's outcome is unchanged",
        name,
        getattr(hook, "__qualname__", repr(hook)),
        job_id,
        task,
    )


async def arun_hooks(
    lists: Iterable[list[Hook]], name: str, job_id: str, task: str, *args: Any
) -> None:
    """Call every hook of ``lists`` in order, on the running loop: async ones awaited, sync
    ones in a thread. Errors are logged, never raised."""
    for hooks in lists:
        for hook in hooks:
            try:
                if inspect.iscoroutinefunction(hook):
                    await hook(*args)
                else:
                    result = await asyncio.to_thread(hook, *args)
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
