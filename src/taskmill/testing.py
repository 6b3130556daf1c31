"""Helpers for testing code that uses taskmill (also a pytest plugin, loaded automatically).

- ``App("memory://")``: an in-process broker; ``App("memory://?eager=1")`` runs each job as
  soon as it is sent.
- ``app.run_until_idle()``: run due jobs in this process until none is left.
- ``running_worker(app)``: a real worker on a background thread for the duration of a block.
- the ``taskmill_memory`` fixture: swaps an app's broker for a fresh memory broker.

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
import io
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from taskmill.worker import Worker

try:
    import pytest
except ImportError:  # pragma: no cover - the fixture is only for pytest users
    pytest = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from taskmill.brokers.base import Broker
    from taskmill.client import AppParts, Client

A = TypeVar("A", bound="AppParts")


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
