"""A worker inside another program: a web app's process (one container on Cloud Run, one
FastAPI process), a script, a notebook. See docs/embedding.md.

- ``async with app.worker(...) as w:`` runs a ``Worker`` on the current event loop as a
  background task, and drains it when the block exits.
- ``with app.worker_thread(...) as w:`` (or ``w = app.worker_thread(...).start()`` and later
  ``w.stop()``) runs one on a thread of its own, with its own event loop.

Both start by opening the broker: entering returns once it is open (a broker that cannot be
reached is retried with back-off, bounded by ``max_start_wait_s``), or raises the error that
stopped the start. An error that ends the worker later is logged at once and raised again on
exit (or by ``stop()``): it is never lost. Neither form installs signal handlers: the host
program owns its signals and stops the worker by leaving the block.

>>> from taskmill import App
>>> app = App("memory://")
>>> @app.task()
... def double(x: int) -> int:
...     return 2 * x
>>> with app.worker_thread(concurrency=2) as w:
...     double.send(21).result(timeout=5)
42
>>> w.running
False
>>> app.close()
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from taskmill.settings import MISSED_HEARTBEATS
from taskmill.worker.health import heartbeat_status
from taskmill.worker.worker import Worker

if TYPE_CHECKING:
    from taskmill.client import AppParts

log = logging.getLogger("taskmill.worker")


def _make_worker(
    app: AppParts, queues: Sequence[str] | None, concurrency: int, options: dict[str, Any]
) -> Worker:
    # the same default as `taskmill worker`: every queue the app's tasks use, and the default
    default = app.registry.queues(app.client.settings.default_queue)
    return Worker(app, queues=queues or default, concurrency=concurrency, **options)


def _healthy(worker: Worker, started: float | None) -> bool:
    if started is None:
        return False
    healthy, _ = heartbeat_status(
        worker.last_heartbeat_ok,
        started=started,
        max_age_s=MISSED_HEARTBEATS * worker.heartbeat_s,
        now=time.monotonic(),
        out_of_contact=worker.out_of_contact,
    )
    return healthy


async def _run_until_connected(worker: Worker) -> asyncio.Task[int]:
    """Start ``worker.run()`` as a task; return it once the broker is open, or raise what
    ended it before that. Cancelled meanwhile: the worker is stopped first."""
    task = asyncio.create_task(worker.run(), name=f"taskmill-worker-{worker.id}")
    connected = asyncio.create_task(worker.connected.wait())
    try:
        await asyncio.wait([task, connected], return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        worker.stop()
        await asyncio.wait([task])
        raise
    finally:
        connected.cancel()
    if task.done():
        task.result()  # raises what stopped the start (a stop meanwhile returns 0)
    return task


class EmbeddedWorker:
    """``async with app.worker(...) as w:``: a worker on the current event loop.

    Entering returns once the broker is open; leaving stops claiming and drains running jobs
    (up to ``drain_timeout_s``), then raises any error that ended the worker. ``worker`` is
    the ``Worker`` (its ``id``, ``queues``, …).
    """

    def __init__(
        self,
        app: AppParts,
        *,
        queues: Sequence[str] | None = None,
        concurrency: int = 16,
        **options: Any,
    ) -> None:
        self.worker = _make_worker(app, queues, concurrency, options)
        self._task: asyncio.Task[int] | None = None
        self._started: float | None = None  # time.monotonic() once the broker was open
        self._stopping = False

    @property
    def id(self) -> str:
        return self.worker.id

    @property
    def running(self) -> bool:
        """True from the start until the worker ends (stopped, or ended by an error)."""
        return self._task is not None and not self._task.done()

    @property
    def healthy(self) -> bool:
        """Running, and the broker took a heartbeat within three heartbeat intervals, or none
        yet but started (entered) less than three intervals ago (the rule of ``taskmill
        worker --health-port``): for a web app's own probe, true from start-up on."""
        return self.running and _healthy(self.worker, self._started)

    async def start(self) -> EmbeddedWorker:
        if self._task is not None:
            raise RuntimeError("this worker was started already; make a new one")
        self._task = await _run_until_connected(self.worker)
        self._started = time.monotonic()
        self._task.add_done_callback(self._ended)
        return self

    async def stop(self) -> int:
        """Stop claiming, drain, and wait for the worker to end; the number of jobs it ran.
        Raises the error that ended the worker, if one did. Cancelled while draining: the
        running jobs are handed back at once (a second stop), then the cancel goes on."""
        if self._task is None:
            raise RuntimeError("this worker was never started")
        task = self._task
        self._stopping = True
        self.worker.stop()
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                self.worker.stop()
                await asyncio.wait([task])
            raise

    def _ended(self, task: asyncio.Task[int]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and not self._stopping:
            log.error(
                "worker %s: stopped by an error (raised again when its block exits): %r",
                self.worker.id,
                exc,
                exc_info=exc,
            )

    async def __aenter__(self) -> EmbeddedWorker:
        return await self.start()

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await self.stop()
        except Exception:
            if e is None:
                raise
            # the block's own error goes on; the worker's is not lost either
            log.exception("worker %s: also failed while its block raised", self.worker.id)


class WorkerThread:
    """``with app.worker_thread(...) as w:``, or ``w = app.worker_thread(...).start()`` and
    later ``w.stop(timeout)``: a worker on a thread of its own, for programs without an event
    loop (or whose loop should not carry the worker).

    ``start()`` returns once the broker is open, or raises what stopped the start.
    ``stop()`` drains and joins the thread, and raises any error that ended the worker.
    """

    def __init__(
        self,
        app: AppParts,
        *,
        queues: Sequence[str] | None = None,
        concurrency: int = 16,
        **options: Any,
    ) -> None:
        self.worker = _make_worker(app, queues, concurrency, options)
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._started: float | None = None  # time.monotonic() once the broker was open
        self._stopping = False

    @property
    def id(self) -> str:
        return self.worker.id

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def healthy(self) -> bool:
        """Running, and the broker took a heartbeat within three heartbeat intervals, or none
        yet but started less than three intervals ago."""
        return self.running and _healthy(self.worker, self._started)

    def start(self) -> WorkerThread:
        if self._thread is not None:
            raise RuntimeError("this worker was started already; make a new one")
        # a daemon: a program that forgets stop() still exits (its jobs' leases then expire
        # and other workers recover them)
        self._thread = threading.Thread(
            target=self._target, name=f"taskmill-worker-{self.worker.id}", daemon=True
        )
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            error, self._error = self._error, None
            raise error
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop claiming and drain (running jobs get ``drain_timeout_s``), and wait up to
        ``timeout`` seconds (``None``: until it ends) for the thread. ``TimeoutError`` if it
        is still running then: calling ``stop`` again hands running jobs back at once.
        Raises the error that ended the worker, if one did."""
        if self._thread is None:
            raise RuntimeError("this worker was never started")
        self._stopping = True
        self.worker.stop()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(
                f"worker {self.worker.id} still running {timeout:g} s after stop(); call "
                "stop() again to hand its running jobs back at once"
            )
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _target(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self._error = exc
            if self._ready.is_set() and not self._stopping:
                log.error(
                    "worker %s: stopped by an error (raised again by stop()): %r",
                    self.worker.id,
                    exc,
                    exc_info=exc,
                )
        finally:
            self._ready.set()

    async def _main(self) -> None:
        task = await _run_until_connected(self.worker)
        self._started = time.monotonic()
        self._ready.set()
        await task

    def __enter__(self) -> WorkerThread:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.stop()
        except Exception:
            if e is None:
                raise
            log.exception("worker %s: also failed while its block raised", self.worker.id)


__all__ = ["EmbeddedWorker", "WorkerThread"]
