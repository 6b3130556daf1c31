"""Helpers for testing code that uses taskmill (also a pytest plugin, loaded automatically).

- ``App("memory://")``: an in-process broker; ``App("memory://?eager=1")`` runs each job as
  soon as it is sent.
- ``app.run_until_idle()``: run due jobs in this process until none is left.
- ``running_worker(app)``: a real worker on a background thread for the duration of a block.
- the ``taskmill_memory`` fixture: swaps an app's broker for a fresh memory broker.
- ``wait_until(check)`` / ``await await_until(check)``: poll until a condition holds, or fail
  after a deadline saying what was awaited and what was last seen.

>>> from taskmill import App
>>> app = App("memory://")
>>> @app.task()
... def double(x: int) -> int:
...     return 2 * x
>>> with running_worker(app):
...     double.send(21).result(timeout=5)
42
>>> app.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import io
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

from taskmill.worker import Worker

try:
    import pytest
except ImportError:  # pragma: no cover - the fixture is only for pytest users
    pytest = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from taskmill.brokers.base import Broker
    from taskmill.client import AppParts, Client

A = TypeVar("A", bound="AppParts")

T = TypeVar("T")


@contextlib.contextmanager
def running_worker(
    app: AppParts,
    *,
    queues: Sequence[str] | None = None,
    concurrency: int = 8,
    join_timeout_s: float = 30.0,
    **worker_options: Any,
) -> Iterator[Worker]:
    """Run a worker for ``app`` on a background thread; stop it (draining) on exit.

    ``queues`` defaults to every queue the app's tasks use.
    """
    queues = queues or app.registry.queues(app.client.settings.default_queue)
    worker = Worker(app, queues=queues, concurrency=concurrency, **worker_options)
    started = threading.Event()
    errors: list[BaseException] = []
    loops: list[asyncio.AbstractEventLoop] = []

    async def main() -> None:
        loops.append(asyncio.get_running_loop())
        started.set()
        await worker.run()

    def target() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:
            errors.append(exc)
            started.set()

    thread = threading.Thread(target=target, name="taskmill-test-worker", daemon=True)
    thread.start()
    started.wait(join_timeout_s)
    try:
        yield worker
    finally:
        worker.stop()
        thread.join(join_timeout_s)
        if thread.is_alive():
            where = _tasks_of(loops[0]) if loops else "(its loop never started)"
            raise RuntimeError(
                f"the worker did not stop within {join_timeout_s} s; its tasks:\n{where}"
            )
        if errors:
            raise errors[0]


def _tasks_of(loop: asyncio.AbstractEventLoop) -> str:
    """What a stuck worker's loop is waiting on: each task's stack (asked of the loop)."""
    dumped: list[str] = []
    done = threading.Event()

    def dump() -> None:
        for task in asyncio.all_tasks(loop):
            out = io.StringIO()
            task.print_stack(limit=12, file=out)
            dumped.append(f"{task.get_name()}: {out.getvalue()}")
        done.set()

    try:
        loop.call_soon_threadsafe(dump)
    except RuntimeError:
        return "(its loop is closed)"
    done.wait(5)
    return "\n".join(dumped) or "(no tasks)"


def taskmill_memory() -> Iterator[Callable[[A], A]]:
    """Point apps at a fresh memory broker for one test; restored afterwards.

    ``def test_signup(taskmill_memory): taskmill_memory(myapp.app); ...``
    """
    from taskmill.brokers.memory import MemoryBroker

    swapped: list[tuple[Client, Broker | None, str, bool]] = []

    def use(app: A) -> A:
        client = app.client
        swapped.append((client, client._broker, client.url, client._opened))
        client.use_broker(MemoryBroker(), "memory://")
        return app

    yield use
    for client, broker, url, opened in reversed(swapped):
        with contextlib.suppress(Exception):
            client.close()
        client.use_broker(broker, url)
        client._opened = opened


if pytest is not None:
    taskmill_memory = pytest.fixture(taskmill_memory)


_REPR_LIMIT = 500
"""Characters of the last value a timeout message shows (a list of jobs can be long)."""


def wait_until(
    check: Callable[[], T | Literal[False] | None],
    *,
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str | Callable[[], str] = "the condition",
) -> T:
    """Call ``check`` every ``interval`` s until it returns something truthy, and return that.

    After ``timeout`` s it raises ``TimeoutError`` naming ``what`` was awaited (a callable
    ``what`` is called then, to describe the state at the failure) and the last value
    ``check`` returned. An exception from ``check`` propagates at once: a check can fail
    early (for example when the process it waits on has exited).

    >>> from taskmill import App
    >>> app = App("memory://")
    >>> @app.task()
    ... def double(x: int) -> int:
    ...     return 2 * x
    >>> with running_worker(app):
    ...     handle = double.send(21)
    ...     wait_until(lambda: handle.status() == "succeeded", what="the job to succeed")
    True
    >>> wait_until(lambda: [], timeout=0.05, what="a non-empty list")
    Traceback (most recent call last):
      ...
    TimeoutError: timed out after 0.05 s waiting for a non-empty list (last: [])
    >>> app.close()
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _timed_out(timeout, what, value)
        time.sleep(interval)


@overload
async def await_until(
    check: Callable[[], Awaitable[T | Literal[False] | None]],
    *,
    timeout: float = ...,
    interval: float = ...,
    what: str | Callable[[], str] = ...,
) -> T: ...


@overload
async def await_until(
    check: Callable[[], T | Literal[False] | None],
    *,
    timeout: float = ...,
    interval: float = ...,
    what: str | Callable[[], str] = ...,
) -> T: ...


async def await_until(
    check: Callable[[], Any],
    *,
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str | Callable[[], str] = "the condition",
) -> Any:
    """``wait_until`` for async code: ``check`` may be a plain function or a coroutine
    function, and the event loop runs on between calls.

    >>> import asyncio
    >>> from taskmill import App
    >>> async def main() -> bool:
    ...     async with App("memory://") as app:
    ...         @app.task()
    ...         async def ping() -> str:
    ...             return "pong"
    ...         handle = await ping.asend()
    ...         async def succeeded() -> bool:
    ...             return await handle.astatus() == "succeeded"
    ...         async with app.worker():
    ...             return await await_until(succeeded, what="the job to succeed")
    >>> asyncio.run(main())
    True
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _timed_out(timeout, what, value)
        await asyncio.sleep(interval)


def _timed_out(timeout: float, what: str | Callable[[], str], last: object) -> TimeoutError:
    text = what() if callable(what) else what
    shown = repr(last)
    if len(shown) > _REPR_LIMIT:
        shown = f"{shown[:_REPR_LIMIT]}... ({len(shown)} characters)"
    return TimeoutError(f"timed out after {timeout} s waiting for {text} (last: {shown})")
