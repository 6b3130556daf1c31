"""Where a task's function runs: async on the loop, sync in threads, or in child processes."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, Protocol

from taskmill.context import JobContext, reset_current, set_current
from taskmill.errors import TaskTimeoutError
from taskmill.task import Task

log = logging.getLogger("taskmill.worker")
_HANDOFF_WAIT_S = 0.002


class Runner(Protocol):
    """Where a sync task function runs (async ones always run on the worker's loop)."""

    async def call(
        self,
        task: Task[Any, Any],
        args: list[Any],
        kwargs: dict[str, Any],
        ctx: JobContext,
        timeout_s: float | None,
    ) -> Any: ...

    def close(self) -> None: ...


def _in_thread(
    ctx: JobContext,
    fn: Callable[..., Any],
    args: list[Any],
    kw: dict[str, Any],
    started: threading.Event | None = None,
) -> Any:
    token = set_current(ctx)
    if started is not None:
        started.set()
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


_WorkItem = tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]


class DaemonThreadPool(Executor):
    """A fixed pool of daemon threads.

    ``ThreadPoolExecutor`` joins its threads at interpreter exit, so one sync task that ignores
    ``current_job().cancelled`` would keep a stopped worker's process alive after its job was
    handed back. Daemon threads end with the process instead.
    """

    def __init__(self, threads: int, name: str) -> None:
        self._queue: queue.SimpleQueue[_WorkItem | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True)
            for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()
        self._closed = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        if self._closed:
            raise RuntimeError("the task thread pool is shut down")
        future: Future[Any] = Future()
        call = (lambda: fn(*args, **kwargs)) if kwargs else fn
        self._queue.put((future, call, () if kwargs else args))
        return future

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            future, fn, args = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as exc:  # handed to the awaiting coroutine, as an executor does
                future.set_exception(exc)
            else:
                future.set_result(result)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._closed = True
        for _ in self._threads:
            self._queue.put(None)
        if wait:
            for thread in self._threads:
                thread.join()


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
        return _in_thread(ctx, task.fn, args, kwargs)

    def close(self) -> None:
        pass


class ThreadRunner:
    """Sync tasks in a thread pool. A timeout fails the job and sets ``cancelled``; the thread
    itself cannot be stopped, so it finishes in the background (use the process pool for hard
    limits)."""

    def __init__(self, threads: int) -> None:
        self._pool = DaemonThreadPool(threads, "taskmill-task")
        self._active = 0  # jobs submitted and not yet done (only the loop thread counts)

    async def call(
        self,
        task: Task[Any, Any],
        args: list[Any],
        kwargs: dict[str, Any],
        ctx: JobContext,
        timeout_s: float | None,
    ) -> Any:
        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()
        if self._active:
            fut = loop.run_in_executor(
                self._pool, context.run, _in_thread, ctx, task.fn, args, kwargs
            )
        else:
            # An idle worker's first job: the loop goes straight on to its next claim, holding
            # the GIL for that while the woken thread waits for it (a few hundred microseconds
            # of start latency). Let the thread begin first; a busy pool never waits here.
            started = threading.Event()
            fut = loop.run_in_executor(
                self._pool, context.run, _in_thread, ctx, task.fn, args, kwargs, started
            )
            started.wait(_HANDOFF_WAIT_S)
        self._active += 1
        try:
            return await self._result(fut, task, ctx, timeout_s)
        finally:
            self._active -= 1

    @staticmethod
    async def _result(
        fut: asyncio.Future[Any], task: Task[Any, Any], ctx: JobContext, timeout_s: float | None
    ) -> Any:
        if timeout_s is None:
            return await fut
        try:
            async with asyncio.timeout(timeout_s):
                return await fut
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
