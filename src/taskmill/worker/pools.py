"""Where a task's function runs: async on the loop, sync in threads, or in child processes."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import queue
import threading
from collections.abc import Callable, Coroutine, Generator
from concurrent.futures import Executor, Future
from typing import Any, Protocol

from taskmill.context import JobContext, reset_current, set_current
from taskmill.errors import SoftTimeLimitExceeded, TaskTimeoutError
from taskmill.registry import TaskDefinition

log = logging.getLogger("taskmill.worker")
_HANDOFF_WAIT_S = 0.002


class Runner(Protocol):
    """Where a sync task function runs (async ones always run on the worker's loop)."""

    async def call(
        self,
        task: TaskDefinition,
        args: list[Any],
        kwargs: dict[str, Any],
        ctx: JobContext,
        timeout_s: float | None,
        soft_timeout_s: float | None = None,
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


def soft_limit_message(task: str, soft_timeout_s: float) -> str:
    return f"task {task} exceeded its soft time limit of {soft_timeout_s:g} s"


def hard_limit_message(task: str, timeout_s: float, what_happened: str) -> str:
    return f"task {task} timed out after {timeout_s:g} s (its hard time limit); {what_happened}"


async def call_async(
    task: TaskDefinition,
    args: list[Any],
    kwargs: dict[str, Any],
    ctx: JobContext,
    timeout_s: float | None,
    soft_timeout_s: float | None = None,
) -> Any:
    """Run an async task on this loop (each job runs in its own asyncio task and context)."""
    set_current(ctx)
    coro = task.fn(*args, **kwargs)
    if soft_timeout_s is not None:
        coro = _SoftLimited(coro, soft_timeout_s, ctx, task.name)
    if timeout_s is None:
        return await coro
    try:
        async with asyncio.timeout(timeout_s) as scope:
            return await coro
    except TimeoutError:
        if scope.expired():
            raise TaskTimeoutError(
                hard_limit_message(task.name, timeout_s, "it was cancelled")
            ) from None
        raise


class _SoftLimited:
    """Awaits a task's coroutine and, at its soft limit, raises ``SoftTimeLimitExceeded``
    inside it, at the ``await`` where it waits.

    asyncio can only cancel a task. So at the soft limit this cancels the job's asyncio task,
    which wakes it from whatever it awaits (that is cancelled), and throws the soft-limit
    exception into the coroutine in place of the ``CancelledError``: the task's own ``except
    SoftTimeLimitExceeded`` or ``finally`` then runs, and it may still return. The request is
    withdrawn (``uncancel``) so the hard limit's ``asyncio.timeout`` counts right; a cancel
    from anyone else that arrives meanwhile (the hard limit, a worker stop) goes through.
    """

    def __init__(
        self, coro: Coroutine[Any, Any, Any], soft_timeout_s: float, ctx: JobContext, task: str
    ) -> None:
        self._coro = coro
        self._soft_timeout_s = soft_timeout_s
        self._ctx = ctx
        self._task = task
        self._asked = False  # our cancel is on its way to the coroutine

    def __await__(self) -> Generator[Any, None, Any]:
        job_task = asyncio.current_task()
        assert job_task is not None
        timer = asyncio.get_running_loop().call_later(self._soft_timeout_s, self._expire, job_task)
        try:
            return (yield from self._drive(job_task))
        finally:
            timer.cancel()

    def _expire(self, job_task: asyncio.Task[Any]) -> None:
        self._ctx._pass_soft_limit()
        self._asked = job_task.cancel()

    def _drive(self, job_task: asyncio.Task[Any]) -> Generator[Any, None, Any]:
        # what ``yield from self._coro`` does, with one exception swapped on the way in
        coro = self._coro
        sent: Any = None
        thrown: BaseException | None = None
        while True:
            try:
                waited_on = coro.send(sent) if thrown is None else coro.throw(thrown)
            except StopIteration as stop:
                return stop.value
            sent, thrown = None, None
            try:
                sent = yield waited_on
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:
                thrown = self._instead_of(exc, job_task)

    def _instead_of(self, exc: BaseException, job_task: asyncio.Task[Any]) -> BaseException:
        if not (self._asked and isinstance(exc, asyncio.CancelledError)):
            return exc
        self._asked = False
        if job_task.uncancel() > 0:
            return exc  # cancelled by someone else as well: that cancel wins
        return SoftTimeLimitExceeded(soft_limit_message(self._task, self._soft_timeout_s))


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
        task: TaskDefinition,
        args: list[Any],
        kwargs: dict[str, Any],
        ctx: JobContext,
        timeout_s: float | None,
        soft_timeout_s: float | None = None,
    ) -> Any:
        return _in_thread(ctx, task.fn, args, kwargs)

    def close(self) -> None:
        pass


class ThreadRunner:
    """Sync tasks in a thread pool. The soft limit sets ``soft_limit_exceeded`` and
    ``cancelled``; the hard limit fails the job and sets ``cancelled``. The thread itself cannot
    be stopped, so it finishes in the background (use the process pool for hard limits).

    No exception is raised into the thread at the soft limit. ``PyThreadState_SetAsyncExc``
    could, but it is deliberately not used: it fires only between bytecodes (never while the
    thread blocks in a sleep, a lock or a socket, the usual reason a task overruns), it lands
    anywhere (inside a ``finally``, half-way through a library's lock-protected update), and
    it cannot be tied to one job: a thread that finished the job just before gets it in the
    next job, or in this pool's own loop.
    """

    def __init__(self, threads: int) -> None:
        self._pool = DaemonThreadPool(threads, "taskmill-task")
        self._active = 0  # jobs submitted and not yet done (only the loop thread counts)

    async def call(
        self,
        task: TaskDefinition,
        args: list[Any],
        kwargs: dict[str, Any],
        ctx: JobContext,
        timeout_s: float | None,
        soft_timeout_s: float | None = None,
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
        soft = (
            None
            if soft_timeout_s is None
            else loop.call_later(soft_timeout_s, ctx._pass_soft_limit)
        )
        try:
            return await self._result(fut, task, ctx, timeout_s)
        finally:
            self._active -= 1
            if soft is not None:
                soft.cancel()

    @staticmethod
    async def _result(
        fut: asyncio.Future[Any], task: TaskDefinition, ctx: JobContext, timeout_s: float | None
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
                hard_limit_message(
                    task.name,
                    timeout_s,
                    "its thread was asked to stop via current_job().cancelled",
                )
            ) from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
