"""``--pool process``: sync tasks in child processes, with hard time limits.

Each child imports the app by its path, runs one job at a time and talks to the worker over a
pipe: the worker sends ``run``, ``cancel`` and ``soft`` (the job passed its soft limit); the
child sends ``ready`` once it has imported the app (a job's time limits count from then),
``progress``, ``ok`` (the result, as JSON) or ``error`` (the error as data, with the
retry decision the child made by the task's policy). At the soft limit the child raises
``SoftTimeLimitExceeded`` in the task's thread (its main thread, woken by ``SIGUSR1``). Each
child leads a process group of its own: a child that overruns its hard limit is killed with
every process it started (``killpg``), and a child whose worker is gone kills its group rather
than run on unsupervised. One that dies mid-job fails the attempt with ``WorkerLostError``. A
child is replaced after ``max_tasks_per_child`` jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

from taskmill.context import JobContext, reset_current, set_current
from taskmill.errors import (
    SerializationError,
    SoftTimeLimitExceeded,
    TaskTimeoutError,
    WorkerLostError,
)
from taskmill.hooks import Instrumentation, carried_context, carry
from taskmill.job import ErrorInfo, Meta
from taskmill.logs import JsonFormatter, LogFormat
from taskmill.logs import configure as configure_logging
from taskmill.registry import Registry, TaskDefinition
from taskmill.retry import Cancel, RemoteError, Retry, error_info
from taskmill.serialization import decode, encode
from taskmill.worker.pools import hard_limit_message, soft_limit_message

log = logging.getLogger("taskmill.worker")

_POLL_S = 0.02
_START_UP_S = 60.0
"""How long a new child may take to import the app. Its job's time limits count from then, so
a slow start (a loaded machine, a heavy app) is not taken for the task overrunning; a child that
has not started by then is killed and the attempt fails with ``WorkerLostError``."""


class _Child:
    def __init__(self, app_path: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child_conn = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(
            target=child_main,
            args=(app_path, child_conn, inherited_logging()),
            name="taskmill-child",
            daemon=True,
        )
        self.proc.start()
        child_conn.close()
        self.jobs_done = 0
        self.ready = False  # it has imported the app

    @property
    def alive(self) -> bool:
        return self.proc.is_alive()

    def run(
        self,
        task: str,
        args: list[Any],
        kwargs: dict[str, Any],
        ctx: JobContext,
        timeout_s: float | None,
        soft_timeout_s: float | None = None,
        carried: Meta | None = None,
    ) -> Any:
        self.jobs_done += 1
        self.conn.send(
            ("run", ctx.id, task, ctx.queue, ctx.attempt, ctx.max_attempts, args, kwargs, carried)
        )
        started = time.monotonic()
        cancel_sent = soft_sent = False
        while True:
            if self.conn.poll(_POLL_S):
                kind, value = self._receive(task, ctx)
                if kind == "ok":
                    return value
                if kind == "ready":  # a new child has imported the app: the time limits start
                    started = time.monotonic()
            elif not self.alive:
                raise self._died(task)
            ran_s = time.monotonic() - started
            if not self.ready:
                self._check_start_up(task, ran_s)
            elif soft_timeout_s is not None and ran_s > soft_timeout_s and not soft_sent:
                self.conn.send(("soft", ctx.id, soft_limit_message(task, soft_timeout_s)))
                soft_sent = True
            if self.ready and timeout_s is not None and ran_s > timeout_s:
                self.kill()
                raise TaskTimeoutError(
                    hard_limit_message(
                        task,
                        timeout_s,
                        "its child process and the processes it started were killed",
                    )
                )
            if ctx.cancelled and not cancel_sent:
                self.conn.send(("cancel",))
                cancel_sent = True

    def _check_start_up(self, task: str, waited_s: float) -> None:
        if waited_s > _START_UP_S:
            self.kill()
            raise WorkerLostError(
                f"the child process for task {task} had not imported the app after "
                f"{_START_UP_S:g} s: killed before the job started"
            )

    def _receive(self, task: str, ctx: JobContext) -> tuple[str, Any]:
        """The child's next message: ``("ok", result)``, ``("ready", None)`` (it imported the
        app) or ``("progress", None)`` (reported); its error is raised as the task's."""
        try:
            msg = self.conn.recv()
        except (EOFError, OSError):
            self.proc.join(5)
            raise self._died(task) from None
        kind = msg[0]
        if kind == "ready":
            self.ready = True
        elif kind == "progress":
            ctx._report(ctx.id, msg[1], msg[2])
        elif kind == "ok":
            return kind, decode(msg[1])
        elif kind == "error":
            _, (etype, message, tb), retryable, delay, cancelled = msg
            if cancelled:
                raise Cancel(message)
            raise RemoteError(ErrorInfo(etype, message, tb), retryable=retryable, delay=delay)
        return kind, None

    def _died(self, task: str) -> WorkerLostError:
        return WorkerLostError(
            f"the child process running task {task} died (exit code {self.proc.exitcode})"
        )

    def kill(self) -> None:
        """Kill the child and every process it started: its process group, whose id is the
        child's pid, which cannot name another group while the child is not reaped."""
        assert self.proc.pid is not None  # started in __init__
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # not yet its own group leader: it has started nothing
            self.proc.kill()
        self.proc.join(5)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(("stop",))
        self.proc.join(2)
        if self.proc.is_alive():
            self.kill()
        self.conn.close()


class ProcessRunner:
    def __init__(
        self,
        app_path: str,
        size: int,
        max_tasks_per_child: int | None,
        instrumentations: Sequence[Instrumentation] = (),
    ) -> None:
        self.app_path = app_path
        self.max_tasks_per_child = max_tasks_per_child
        self.instrumentations = instrumentations
        """The app's (a live list): what they carry goes with each job to its child."""
        self._idle: list[_Child] = []
        self._threads = ThreadPoolExecutor(size, thread_name_prefix="taskmill-child-io")
        self._all: set[_Child] = set()

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
        child = self._idle.pop() if self._idle else None
        if child is None or not child.alive:
            child = await loop.run_in_executor(self._threads, _Child, self.app_path)
            self._all.add(child)
        reusable = False
        # here, in the job's own asyncio task: inside the instrumentations' running()
        carried = carry(self.instrumentations) if self.instrumentations else None
        try:
            result = await loop.run_in_executor(
                self._threads,
                child.run,
                task.name,
                args,
                kwargs,
                ctx,
                timeout_s,
                soft_timeout_s,
                carried,
            )
            reusable = True
            return result
        except (RemoteError, Cancel):
            reusable = True
            raise
        finally:
            spent = self.max_tasks_per_child is not None and (
                child.jobs_done >= self.max_tasks_per_child
            )
            if reusable and child.alive and not spent:
                self._idle.append(child)
            else:
                self._all.discard(child)
                await loop.run_in_executor(self._threads, child.stop)

    def close(self) -> None:
        for child in list(self._all):
            child.stop()
        self._threads.shutdown(wait=False, cancel_futures=True)


class _SoftLimit:
    """A child's soft limit. The reader thread arms it for each job the worker sends and marks
    it due when the worker says that job passed its soft limit; the main thread, which runs
    the task, raises ``SoftTimeLimitExceeded`` then (woken by ``SIGUSR1``) or as the task
    starts, and never outside the task's function.

    A signal carries no job id, so the job is matched on the reader's side, and a signal that
    arrives after its job ended finds nothing due (the next ``run`` disarmed it).
    """

    def __init__(self) -> None:
        self._job_id: str | None = None  # the job the worker sent last (reader thread)
        self._due: str | None = None  # the message to raise with, once due
        self._ctx: JobContext | None = None  # set while the task's function runs
        self._held = False  # the main thread is in a block the exception must not cut
        self._main = threading.get_ident()  # made on the main thread, which runs the tasks

    def arm(self, job_id: str) -> None:
        self._job_id, self._due = job_id, None

    def passed(self, job_id: str, message: str) -> None:
        if job_id == self._job_id:
            self._due = message
            # at the main thread: only there does the signal interrupt what the task waits in
            signal.pthread_kill(self._main, signal.SIGUSR1)

    def enter(self, ctx: JobContext) -> None:
        self._ctx = ctx
        self.raise_if_due()

    def leave(self) -> None:
        self._ctx = None

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Delay the exception past a block of the main thread (other threads: no effect)."""
        if threading.get_ident() != self._main or self._held:
            yield
            return
        self._held = True
        try:
            yield
        finally:
            self._held = False
        self.raise_if_due()

    @property
    def running(self) -> bool:
        return self._ctx is not None

    def raise_if_due(self, *_signal: object) -> None:
        ctx = self._ctx
        if ctx is None or self._due is None or self._held:
            return
        message, self._due = self._due, None
        ctx._pass_soft_limit()
        raise SoftTimeLimitExceeded(message)


def _kill_own_group() -> None:
    """The worker is gone mid-job: nobody will take the result, and the job goes back to the
    queue when its lease expires. Stop the task and what it started rather than let it run on
    unsupervised (only when this child leads its group: never the worker's)."""
    if os.getpgid(0) == os.getpid():
        os.killpg(0, signal.SIGKILL)
    os._exit(1)


def inherited_logging() -> tuple[str, LogFormat] | None:
    """How this process logs, for a child to do the same: the root logger's level, and JSON
    if a handler of it formats so (None: logging was not set up here, so the child leaves it)."""
    root = logging.getLogger()
    if not root.handlers:
        return None
    json_lines = any(isinstance(h.formatter, JsonFormatter) for h in root.handlers)
    return logging.getLevelName(root.level), "json" if json_lines else "text"


def child_main(
    app_path: str, conn: Connection, log_setup: tuple[str, LogFormat] | None = None
) -> None:
    """Entry point of a child process."""
    from taskmill.loader import load_app

    if log_setup is not None:  # a task's log lines come out as the worker's do
        configure_logging(*log_setup)
    os.setsid()  # a process group of its own, so a hard limit kills what the task started
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker decides when children stop
    soft_limit = _SoftLimit()
    signal.signal(signal.SIGUSR1, soft_limit.raise_if_due)
    app = load_app(app_path)
    conn.send(("ready",))
    inbox: queue.Queue[tuple[Any, ...] | None] = queue.Queue()
    cancelled = threading.Event()

    def report(_id: str, fraction: float | None, message: str | None) -> None:
        with soft_limit.held():  # its exception must not cut a message to the worker in half
            conn.send(("progress", fraction, message))

    reader = threading.Thread(
        target=_read_messages,
        args=(conn, inbox, cancelled, soft_limit),
        daemon=True,
        name="taskmill-child-reader",
    )
    reader.start()
    while True:
        msg = inbox.get()
        if msg is None or msg[0] == "stop":
            return
        _run_in_child(app.registry, msg, conn, report, cancelled, soft_limit)


def _read_messages(
    conn: Connection,
    inbox: queue.Queue[tuple[Any, ...] | None],
    cancelled: threading.Event,
    soft_limit: _SoftLimit,
) -> None:
    """The child's reader thread: cancels and soft limits act at once (the job runs on the
    main thread); jobs and stops go to the inbox; a closed pipe (the worker died) ends it."""
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            if soft_limit.running:
                _kill_own_group()
            inbox.put(None)
            return
        if msg[0] == "cancel":
            cancelled.set()
        elif msg[0] == "soft":
            soft_limit.passed(msg[1], msg[2])
        else:
            if msg[0] == "run":
                cancelled.clear()  # here, not as the job starts: a cancel may follow it
                soft_limit.arm(msg[1])
            inbox.put(msg)


def _run_in_child(
    app: Registry,
    msg: tuple[Any, ...],
    conn: Connection,
    report: Callable[[str, float | None, str | None], None],
    cancelled: threading.Event,
    soft_limit: _SoftLimit,
) -> None:
    """Run one job sent by the worker and send back its result or its error (the task's
    retry policy applied here: the exception object stays in this process)."""
    _, job_id, task_name, queue_name, attempt, max_attempts, args, kwargs, carried = msg
    ctx = JobContext(
        id=job_id,
        task=task_name,
        queue=queue_name,
        attempt=attempt,
        max_attempts=max_attempts,
        _report=report,
        _cancelled=cancelled,
        _arguments=(args, kwargs),  # decoded by the worker: current_job().args
    )
    token = set_current(ctx)
    try:
        task = app.get_task(task_name)
        soft_limit.enter(ctx)
        try:
            with _carried(app, carried):
                value = task.fn(*args, **kwargs)
                if task.is_async:  # asyncio.run copies this context into its task
                    value = asyncio.run(value)
        finally:
            soft_limit.leave()
        conn.send(("ok", encode(value, what=f"result of task {task_name!r}")))
    except BaseException as exc:
        info = error_info(exc)
        try:  # as in the thread pool: no retry makes a result (or arguments) convert
            retryable = not isinstance(exc, SerializationError) and app.get_task(
                task_name
            ).policy.retryable(exc)
        except Exception:
            retryable = False
        delay = exc.delay if isinstance(exc, Retry) else None
        payload = (info.type, info.message, info.traceback)
        conn.send(("error", payload, retryable, delay, isinstance(exc, Cancel)))
    finally:
        reset_current(token)


def _carried(app: Registry, carried: Meta | None) -> contextlib.AbstractContextManager[object]:
    """The context the worker's instrumentations carried, made current for the function."""
    if not carried:
        return contextlib.nullcontext()
    return carried_context(app.instrumentations, carried)
