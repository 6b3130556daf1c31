"""``--pool process``: sync tasks in child processes, with hard time limits.

Each child imports the app by its path, runs one job at a time and talks to the worker over a
pipe: the worker sends ``run`` and ``cancel``; the child sends ``progress``, ``ok`` (the
result, as JSON) or ``error`` (the error as data, with the retry decision the child made by
the task's policy). A child that overruns its timeout is killed; one that dies mid-job fails
the attempt with ``WorkerLostError``. A child is replaced after ``max_tasks_per_child`` jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import queue
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

from taskmill.context import JobContext, reset_current, set_current
from taskmill.errors import TaskTimeoutError, WorkerLostError
from taskmill.job import ErrorInfo
from taskmill.retry import Cancel, RemoteError, Retry, error_info
from taskmill.serialization import decode, encode
from taskmill.task import Task

log = logging.getLogger("taskmill.worker")

_POLL_S = 0.02


class _Child:
    def __init__(self, app_path: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child_conn = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(
            target=child_main, args=(app_path, child_conn), name="taskmill-child", daemon=True
        )
        self.proc.start()
        child_conn.close()
        self.jobs_done = 0

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
    ) -> Any:
        self.jobs_done += 1
        self.conn.send(
            ("run", ctx.id, task, ctx.queue, ctx.attempt, ctx.max_attempts, args, kwargs)
        )
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        cancel_sent = False
        while True:
            if self.conn.poll(_POLL_S):
                try:
                    msg = self.conn.recv()
                except (EOFError, OSError):
                    self.proc.join(5)
                    raise WorkerLostError(
                        f"the child process running task {task} died "
                        f"(exit code {self.proc.exitcode})"
                    ) from None
                kind = msg[0]
                if kind == "progress":
                    ctx._report(ctx.id, msg[1], msg[2])
                elif kind == "ok":
                    return decode(msg[1])
                elif kind == "error":
                    _, (etype, message, tb), retryable, delay, cancelled = msg
                    info = ErrorInfo(etype, message, tb)
                    if cancelled:
                        raise Cancel(message)
                    raise RemoteError(info, retryable=retryable, delay=delay)
            elif not self.alive:
                raise WorkerLostError(
                    f"the child process running task {task} died (exit code {self.proc.exitcode})"
                )
            if deadline is not None and time.monotonic() > deadline:
                self.kill()
                raise TaskTimeoutError(
                    f"task {task} timed out after {timeout_s} s; its child process was killed"
                )
            if ctx.cancelled and not cancel_sent:
                self.conn.send(("cancel",))
                cancel_sent = True

    def kill(self) -> None:
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
    def __init__(self, app_path: str, size: int, max_tasks_per_child: int | None) -> None:
        self.app_path = app_path
        self.max_tasks_per_child = max_tasks_per_child
        self._idle: list[_Child] = []
        self._threads = ThreadPoolExecutor(size, thread_name_prefix="taskmill-child-io")
        self._all: set[_Child] = set()

    async def call(
        self,
        task: Task[Any, Any],
        args: list[Any],
        kwargs: dict[str, Any],
        ctx: JobContext,
        timeout_s: float | None,
    ) -> Any:
        loop = asyncio.get_running_loop()
        child = self._idle.pop() if self._idle else None
        if child is None or not child.alive:
            child = await loop.run_in_executor(self._threads, _Child, self.app_path)
            self._all.add(child)
        reusable = False
        try:
            result = await loop.run_in_executor(
                self._threads, child.run, task.name, args, kwargs, ctx, timeout_s
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


def child_main(app_path: str, conn: Connection) -> None:
    """Entry point of a child process."""
    from taskmill.loader import load_app

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker decides when children stop
    app = load_app(app_path)
    inbox: queue.Queue[tuple[Any, ...] | None] = queue.Queue()
    cancelled = threading.Event()

    def read() -> None:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                inbox.put(None)
                return
            if msg[0] == "cancel":
                cancelled.set()
            else:
                inbox.put(msg)

    threading.Thread(target=read, daemon=True, name="taskmill-child-reader").start()
    while True:
        msg = inbox.get()
        if msg is None or msg[0] == "stop":
            return
        _, job_id, task_name, queue_name, attempt, max_attempts, args, kwargs = msg
        cancelled.clear()
        ctx = JobContext(
            id=job_id,
            task=task_name,
            queue=queue_name,
            attempt=attempt,
            max_attempts=max_attempts,
            _report=lambda _id, f, m: conn.send(("progress", f, m)),
            _cancelled=cancelled,
            _arguments=(args, kwargs),  # decoded by the worker: current_job().args
        )
        token = set_current(ctx)
        try:
            task = app.get_task(task_name)
            value = task.fn(*args, **kwargs)
            if task.is_async:
                value = asyncio.run(value)
            conn.send(("ok", encode(value, what=f"result of task {task_name!r}")))
        except BaseException as exc:
            info = error_info(exc)
            try:
                policy = app.get_task(task_name).policy
                retryable = policy.retryable(exc)
            except Exception:
                retryable = False
            delay = exc.delay if isinstance(exc, Retry) else None
            payload = (info.type, info.message, info.traceback)
            conn.send(("error", payload, retryable, delay, isinstance(exc, Cancel)))
        finally:
            reset_current(token)
