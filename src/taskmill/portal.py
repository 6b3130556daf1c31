"""Daemon threads of taskmill's own: a private event loop (``Portal``), so synchronous code
can call async brokers; and threads for blocking calls (``DaemonThreads``).

Both work while the interpreter exits, in ``atexit`` hooks: ``concurrent.futures`` refuses new
work in every ``ThreadPoolExecutor`` once its own exit hook ran, which is before any ``atexit``
hook, so an ``App.close()`` or a worker's drain registered with ``atexit`` could not reach a
broker that used one.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


class Portal:
    def __init__(self, name: str = "taskmill-portal") -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a blocking taskmill call was made on its own portal loop")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            # end what still runs there (a blocked read, say) before the loop stops
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(_cancel_all(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()


async def _cancel_all() -> None:
    current = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


_Work = tuple[Future[Any], Callable[[], Any]]


class DaemonThreads:
    """Runs blocking calls on up to ``threads`` daemon threads, started as needed; with one
    thread, one call after another on that same thread (a SQLite connection's). Unlike a
    ``ThreadPoolExecutor``, it takes calls at interpreter exit (see the module's doc), and
    does not hold the exit up for a call still running.

    >>> threads = DaemonThreads(1, "doc")
    >>> threads.submit(sum, [1, 2]).result()
    3
    >>> threads.shutdown()
    """

    def __init__(self, threads: int, name: str) -> None:
        self._max = threads
        self._name = name
        self._queue: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)  # one count per thread waiting for work
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, fn: Callable[..., T], /, *args: Any) -> Future[T]:
        """Queue ``fn(*args)``; its future. ``RuntimeError`` after ``shutdown``."""
        future: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self._name}: its threads are shut down")
            self._queue.put((future, lambda: fn(*args)))
            if not self._idle.acquire(blocking=False) and len(self._threads) < self._max:
                thread = threading.Thread(
                    target=self._work, name=f"{self._name}_{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
        return future

    async def run(self, fn: Callable[..., T], /, *args: Any) -> T:
        """``fn(*args)`` on one of the threads, awaited (cancelling the wait cancels a call
        that has not started)."""
        return await asyncio.wrap_future(self.submit(fn, *args))

    def shutdown(self, wait: bool = True) -> None:
        """Take no more calls; the threads end once the calls queued before have run (with
        ``wait``: wait for that, except on one of them)."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        for _ in threads:
            self._queue.put(None)
        if wait:
            for thread in threads:
                if thread is not threading.current_thread():
                    thread.join()

    def _work(self) -> None:
        while True:
            work = self._queue.get()
            if work is None:
                return
            future, call = work
            if future.set_running_or_notify_cancel():
                try:
                    result = call()
                except BaseException as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            del work, future, call  # a result must not live on in this frame while idle
            self._idle.release()


async def in_daemon_thread(fn: Callable[..., T], /, *args: Any, name: str = "taskmill-call") -> T:
    """``fn(*args)`` on a daemon thread of its own, awaited: ``asyncio.to_thread`` for a rare
    blocking call (closing a pool) that must work at interpreter exit too."""
    thread = DaemonThreads(1, name)
    try:
        return await thread.run(fn, *args)
    finally:
        thread.shutdown(wait=False)
