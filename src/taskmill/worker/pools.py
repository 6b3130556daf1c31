"""Where a task's function runs: async on the loop, sync in threads, or in child processes."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Generator
from dataclasses import dataclass
from typing import Any, Protocol

from taskmill.context import JobContext, reset_current, set_current
from taskmill.errors import SoftTimeLimitExceeded, TaskTimeoutError
from taskmill.registry import TaskDefinition

log = logging.getLogger("taskmill.worker")
_HANDOFF_WAIT_S = 0.002
# TaskThreads: how much queued work (by expected durations) one awake thread may have before
# another is woken, and how long no queued call may start before more are
_SPREAD_S = 0.002
_STALL_S = 0.005
# ThreadRunner: how long the pool must have had nothing to run for a job to count as a lone
# one, whose thread the loop lets start first. A drain's batches follow each other faster:
# a claim's round trip, which on PostgreSQL waits for a commit's WAL flush (2-5 ms here). At
# 2 ms, every PostgreSQL batch counted as lone, and the loop's waits cost a no-op job 116 us of
# worker CPU instead of 72 (bench.compare_postgres); at 50 ms, latency at 200 jobs/s on Redis
# did not move (p50 0.54-0.83 ms either way, one run each)
_QUIET_S = 0.05
_RISE = 1.1  # how fast a function's expected duration follows longer runs, per call


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


@dataclass(slots=True, eq=False)
class _Call:
    """One sync function call handed to the task threads; ``future`` lives on the loop."""

    future: asyncio.Future[Any]
    context: contextvars.Context
    ctx: JobContext
    fn: Callable[..., Any]
    args: list[Any]
    kwargs: dict[str, Any]
    started: threading.Event | None
    expected_s: float  # how long calls of ``fn`` took lately
    ends_s: float = 0.0  # once a thread took it: time.monotonic() at which it should return
    # under TaskThreads._lock: a thread took it, it returned, its run was given up (abandon)
    running: bool = False
    done: bool = False
    abandoned: bool = False


class TaskThreads:
    """Daemon threads that run one event loop's sync task calls, with few wake-ups per call.

    ``run_in_executor`` on a thread pool costs, for every call, a thread woken to run it, a
    loop woken for its result (``call_soon_threadsafe``: a write to the loop's self-pipe) and,
    with 16 threads woken for 16 short calls, turns at the GIL between them and the loop. On
    the I/O benchmark (one Redis round trip per job) that was 6 to 7 context switches per job
    and 1.7 times the worker's CPU time per job of calling the function on the loop itself.
    So here:

    - a thread that finishes a call takes the next queued one itself. Threads are woken once
      the loop has queued what it had to, as many as the queued calls need by how long calls
      of the same functions took lately: one thread for each ``spread_s`` of expected work
      (short calls run one after another on one thread; slow ones get a thread each at once),
      counting as free only the threads whose call should end within ``spread_s``;
    - results go back in batches: a thread hands its results to the loop (one
      ``call_soon_threadsafe``) when it finds the queue empty, so the loop sleeps while the
      calls it queued run (no turns at the GIL) and wakes once for all of them, or when the
      next call is expected to take longer than ``spread_s`` (its results would wait for it);
    - a watch timer on the loop, every ``stall_s`` while calls are queued or results wait,
      handles calls slower than usual: if no thread could take a queued call meanwhile,
      those awake are stuck, so as many more are woken as are awake (16 threads within
      four rounds), and the results a stuck thread holds are collected.

    Threads are daemons, started on demand up to ``threads``: ``ThreadPoolExecutor`` joins its
    threads at interpreter exit, so one sync task that ignores ``current_job().cancelled``
    would keep a stopped worker's process alive after its job was handed back.

    A call whose run was given up while it ran (``abandon``: its hard time limit passed) keeps
    its thread until the function returns, which may be never. So that the pool still runs
    ``threads`` calls at once, such a thread is not counted: a replacement may start, up to
    ``threads`` replacements (at most twice ``threads`` threads in all). Past that bound the
    pool shrinks by one thread per further abandoned run, and says so (CRITICAL, each time): the
    worker should be restarted. A stuck thread whose call does return later ends if the pool
    has more threads than it needs.
    """

    def __init__(
        self,
        threads: int,
        name: str,
        loop: asyncio.AbstractEventLoop,
        spread_s: float = _SPREAD_S,
        stall_s: float = _STALL_S,
    ) -> None:
        self._max = threads
        self._name = name
        self._loop = loop
        self._spread_s = spread_s
        self._stall_s = stall_s
        self._lock = threading.Lock()  # guards the fields below (the loop's own: see after)
        self._queue: deque[_Call] = deque()
        self._queued_s = 0.0  # the expected durations of the calls queued, summed
        self._idle: list[threading.Lock] = []  # a sleeping thread's wake-up (held while asleep)
        self._threads: list[threading.Thread] = []
        self._started = 0  # threads ever started (their names' numbers)
        self._stuck = 0  # threads running an abandoned call
        self._awake = 0  # threads running a call or about to look at the queue
        self._taken: set[_Call] = set()  # the calls threads are running (abandoned ones too)
        self._last_start = 0.0  # time.monotonic() at which a thread last took a call
        self._durations: dict[Callable[..., Any], float] = {}  # see expected_s
        self._results: list[tuple[_Call, Any, BaseException | None]] = []
        self._delivery_due = False  # a _deliver is scheduled on the loop
        self._kick_due = False  # the loop's own: a _kick is scheduled
        self._closed = False
        self._watch: asyncio.TimerHandle | None = None  # the loop's own

    def expected_s(self, fn: Callable[..., Any]) -> float:
        """How long a call of ``fn`` is expected to take: ``spread_s`` if it never ran here
        (a thread of its own, until it is known), else its shortest recent run. The
        shortest, not the mean: a short call that waited for the GIL while the loop was busy
        took longer, and more threads would only wait for it too. The figure rises by 10 %
        a call towards longer runs, so a function that became slow is soon known as such."""
        return self._durations.get(fn, self._spread_s)

    def submit(self, call: _Call, now: bool = False) -> None:
        """Queue ``call`` (on the loop's thread); its future gets the result. Threads are woken
        once the loop has queued what it had to (``now``: at once, for an idle pool's job)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the task threads are shut down")
            self._queue.append(call)
            self._queued_s += call.expected_s
            if now and self._awake == 0:
                self._wake_one()
        if not self._kick_due:
            self._kick_due = True
            self._loop.call_soon(self._kick)
        if self._watch is None:
            self._watch = self._loop.call_later(self._stall_s, self._on_watch)

    def _kick(self) -> None:
        """Wake as many threads as the calls queued need: one, or one per ``spread_s`` of the
        time they are expected to take."""
        self._kick_due = False
        with self._lock:
            wanted = min(len(self._queue), max(1, math.ceil(self._queued_s / self._spread_s)))
            for _ in range(wanted - self._free_soon()):
                if not self._wake_one():
                    break

    def _free_soon(self) -> int:
        """The awake threads that will look at the queue within ``spread_s`` (under the
        lock): those between calls, and those whose call should return by then. A thread
        in a call of 10 ms would leave a call queued behind it for as long (it ran at 0.63
        of the slots' capacity on 10 ms jobs, against 0.93 for the same job written async)."""
        between = self._awake - len(self._taken)
        if not self._taken:
            return between
        soon = time.monotonic() + self._spread_s
        return between + sum(1 for c in self._taken if not c.abandoned and c.ends_s <= soon)

    def _wake_one(self) -> bool:
        """Wake a sleeping thread or start a new one (under the lock); False if all are up."""
        if self._idle:
            self._awake += 1
            self._idle.pop().release()
            return True
        if len(self._threads) < self._max + min(self._stuck, self._max):
            self._awake += 1
            wake = threading.Lock()
            wake.acquire()
            thread = threading.Thread(
                target=self._work,
                args=(wake,),
                name=f"{self._name}_{self._started}",
                daemon=True,
            )
            self._started += 1
            self._threads.append(thread)
            thread.start()
            return True
        return False

    def _on_watch(self) -> None:
        """Every ``stall_s`` while calls are queued or results wait: if no thread took a
        call meanwhile, those awake are stuck in slow calls: wake more for the queued calls,
        and collect the results finished before (their threads went on to the slow calls)."""
        self._watch = None
        with self._lock:
            stalled = time.monotonic() - self._last_start >= self._stall_s
            if stalled and self._queue:
                for _ in range(min(len(self._queue), max(self._awake, 1))):
                    if not self._wake_one():
                        break
            collect = stalled and bool(self._results)
            again = bool(self._queue or self._results) and not self._closed
        if collect:
            self._deliver()
        if again:
            self._watch = self._loop.call_later(self._stall_s, self._on_watch)

    def abandon(self, call: _Call) -> None:
        """``call``'s run is given up (on the loop's thread: its hard time limit passed). If
        a thread is running it, that thread no longer counts against ``threads``: another
        may start in its place (see the class)."""
        with self._lock:
            if not call.running or call.done or call.abandoned:
                return  # not started (it never will: its future is cancelled) or returned
            call.abandoned = True
            self._stuck += 1
            stuck, replaced = self._stuck, self._stuck <= self._max
            if replaced and self._queue:
                self._wake_one()
        if replaced:
            log.warning(
                "a task thread is stuck in a run given up at its hard time limit; another "
                "thread takes its place (%d stuck, at most %d replaced; --pool process can "
                "stop such runs)",
                stuck,
                self._max,
            )
        else:
            log.critical(
                "%d task threads are stuck in runs given up at their hard time limits, more "
                "than the %d the pool replaces: it now runs %d sync calls at once instead of "
                "%d; restart this worker (--pool process stops such runs)",
                stuck,
                self._max,
                max(2 * self._max - stuck, 0),
                self._max,
            )

    def _work(self, wake: threading.Lock) -> None:
        while True:
            with self._lock:
                call = self._queue.popleft() if self._queue else None
                if call is not None:
                    self._queued_s -= call.expected_s
                    self._last_start = time.monotonic()
                    call.ends_s = self._last_start + call.expected_s
                    call.running = True
                    self._taken.add(call)
                else:
                    self._awake -= 1
                    if self._closed:
                        return
                    self._idle.append(wake)
            if call is None:
                wake.acquire()  # released by _wake_one (or shutdown)
                continue
            if not call.future.cancelled():  # else: given up before it started (a stop)
                self._run(call)
            else:
                with self._lock:
                    self._returned(call)
            if call.abandoned and self._surplus():
                return

    def _returned(self, call: _Call) -> None:
        """``call`` is over on its thread (under the lock)."""
        call.done = True
        self._taken.discard(call)
        if call.abandoned:
            self._stuck -= 1

    def _surplus(self) -> bool:
        """After an abandoned call returned: end this thread if the pool has more than it
        needs (its replacement started meanwhile)."""
        with self._lock:
            if len(self._threads) <= self._max + min(self._stuck, self._max):
                return False
            self._threads.remove(threading.current_thread())
            self._awake -= 1
            return True

    def _run(self, call: _Call) -> None:
        if call.ctx._mark_idle is not None:
            call.ctx._mark_idle(False)
        began = time.monotonic()
        value, error = None, None
        try:
            value = call.context.run(
                _in_thread, call.ctx, call.fn, call.args, call.kwargs, call.started
            )
        except BaseException as exc:  # handed to the awaiting coroutine, as an executor does
            error = exc
        took = time.monotonic() - began
        with self._lock:
            known = self._durations.get(call.fn)
            self._durations[call.fn] = took if known is None else min(took, known * _RISE)
            self._results.append((call, value, error))
            self._returned(call)
            # results wait for the next short call, not a long one (that is a job's latency)
            hand_over = not self._delivery_due and (
                not self._queue or self._queue[0].expected_s > self._spread_s
            )
            self._delivery_due |= hand_over
        if hand_over:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                self._loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            results, self._results = self._results, []
            self._delivery_due = False
        for call, value, error in results:
            if call.future.done():
                continue  # cancelled meanwhile (a hard time limit, a stop)
            if error is None:
                call.future.set_result(value)
            else:
                call.future.set_exception(error)

    def shutdown(self) -> None:
        """Run no more calls; threads end after their current one (none is waited for)."""
        with self._lock:
            self._closed = True
            self._queue.clear()
            self._queued_s = 0.0
            for wake in self._idle:
                self._awake += 1
                wake.release()
            self._idle.clear()
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None


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
        self._threads = threads
        self._pool: TaskThreads | None = None  # made on the first call, on the worker's loop
        self._active = 0  # jobs submitted and not yet done (only the loop thread counts)
        self._last_done = 0.0  # time.monotonic() when _active last fell to 0

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
        if self._pool is None:
            self._pool = TaskThreads(self._threads, "taskmill-task", loop, _SPREAD_S, _STALL_S)
        pool = self._pool
        fut = loop.create_future()
        # An idle worker's first job: the loop goes straight on to its next claim, holding
        # the GIL for that while the woken thread waits for it (a few hundred microseconds
        # of start latency). Let the thread begin first. A busy pool never waits here, nor
        # one between two batches of a drain: that wait and the thread's extra wake-up cost
        # a no-op job a quarter of its CPU time.
        lone = not self._active and time.monotonic() - self._last_done >= _QUIET_S
        started = threading.Event() if lone else None
        expected = pool.expected_s(task.fn)
        context = contextvars.copy_context()
        call = _Call(fut, context, ctx, task.fn, args, kwargs, started, expected)
        if ctx._mark_idle is not None:
            ctx._mark_idle(True)  # its steps so far completed; it waits for a thread
        pool.submit(call, now=started is not None)
        if started is not None:
            started.wait(_HANDOFF_WAIT_S)
        self._active += 1
        soft = (
            None
            if soft_timeout_s is None
            else loop.call_later(soft_timeout_s, ctx._pass_soft_limit)
        )
        try:
            return await self._result(fut, task, ctx, timeout_s)
        except TaskTimeoutError:
            pool.abandon(call)
            raise
        finally:
            self._active -= 1
            if not self._active:
                self._last_done = time.monotonic()
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
        if self._pool is not None:
            self._pool.shutdown()
