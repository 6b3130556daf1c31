"""Where a task's function runs: async on the loop, sync in threads, or in child processes."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from taskmill.context import JobContext, reset_current, set_current
from taskmill.errors import TaskTimeoutError
from taskmill.task import Task

log = logging.getLogger("taskmill.worker")


class Runner(Protocol):
    async def call(
        self,
        task: Task[Any, Any],
        args: list[Any],
        kwargs: dict[str, Any],
        ctx: JobContext,
        timeout_s: float | None,
    ) -> Any: ...

    def close(self) -> None: ...


def _in_thread(ctx: JobContext, fn: Callable[..., Any], args: list[Any], kw: dict[str, Any]) -> Any:
    token = set_current(ctx)
    try:
        return fn(*args, **kw)
    finally:
        reset_current(token)


async def call_async(
    task: Task[Any, Any],
    args: list[Any],
    kwargs: dict[str, Any],
    ctx: JobContext,
    timeout_s: float | None,
) -> Any:
    """Run an async task on this loop (each job runs in its own asyncio task and context)."""
    set_current(ctx)
    if timeout_s is None:
        return await task.fn(*args, **kwargs)
    try:
        async with asyncio.timeout(timeout_s) as scope:
            return await task.fn(*args, **kwargs)
    except TimeoutError:
        if scope.expired():
            raise TaskTimeoutError(f"task {task.name} timed out after {timeout_s} s") from None
        raise


class InlineRunner:
    """``--pool async``: sync tasks are called on the event loop thread itself. Fastest for
    tiny functions; only for tasks that never block (a blocking one stalls the whole worker)."""

    async def call(
        self,
        task: Task[Any, Any],
        args: list[Any],
        kwargs: dict[str, Any],
        ctx: JobContext,
        timeout_s: float | None,
    ) -> Any:
        if task.is_async:
            return await call_async(task, args, kwargs, ctx, timeout_s)
        return _in_thread(ctx, task.fn, args, kwargs)

    def close(self) -> None:
        pass


class ThreadRunner:
    """Sync tasks in a thread pool. A timeout fails the job and sets ``cancelled``; the thread
    itself cannot be stopped, so it finishes in the background (use the process pool for hard
    limits)."""

    def __init__(self, threads: int) -> None:
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="taskmill-task")

    async def call(
        self,
        task: Task[Any, Any],
        args: list[Any],
        kwargs: dict[str, Any],
        ctx: JobContext,
        timeout_s: float | None,
    ) -> Any:
        if task.is_async:
            return await call_async(task, args, kwargs, ctx, timeout_s)
        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()
        fut = loop.run_in_executor(self._pool, context.run, _in_thread, ctx, task.fn, args, kwargs)
        if timeout_s is None:
            return await fut
        try:
            return await asyncio.wait_for(fut, timeout_s)
        except TimeoutError:
            if fut.done() and not fut.cancelled() and fut.exception() is not None:
                raise  # the task's own TimeoutError
            ctx._cancelled.set()
            raise TaskTimeoutError(
                f"task {task.name} timed out after {timeout_s} s (its thread was asked to stop "
                "via current_job().cancelled)"
            ) from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
