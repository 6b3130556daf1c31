"""``handle.result()`` with events on: woken by the job's finishing event instead of polling,
one subscription for every wait on a loop, and still a result when no event comes."""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import pytest

from taskmill.brokers.base import Broker
from taskmill.brokers.features import Subscription
from taskmill.job import Job
from taskmill.testing import running_worker

from .conftest import AppFactory
from .helpers import opened, wait_until


def count_reads(broker: Broker, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ids of every job read from ``broker`` from now on (the real reads still happen)."""
    reads: list[str] = []
    real: Callable[[str], Awaitable[Job | None]] = broker.get

    async def get(job_id: str) -> Job | None:
        reads.append(job_id)
        return await real(job_id)

    monkeypatch.setattr(broker, "get", get)
    return reads


@pytest.mark.timeout(60)
def test_result_is_woken_by_the_finishing_event_not_by_polling(
    app_factory: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = app_factory(events=True)
    gate = threading.Event()

    @app.task()
    def held() -> str:
        assert gate.wait(10)
        return "done"

    handle = held.send()
    reads = count_reads(opened(app), monkeypatch)
    with running_worker(app, scheduler=False), ThreadPoolExecutor(1) as pool:
        result = pool.submit(handle.result, 10)
        wait_until(lambda: reads, what="the wait's first read")
        # held for 0.3 s: polling (2 ms doubling to 100 ms) would read it about 8 times more
        with pytest.raises(FutureTimeout):
            result.result(timeout=0.3)
        assert reads == [handle.id]
        gate.set()
        assert result.result(timeout=10) == "done"
    assert reads == [handle.id, handle.id]  # one more read, once the event said it finished


@pytest.mark.timeout(60)
def test_waits_on_one_loop_share_one_subscription(
    app_factory: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = app_factory(events=True)
    gate = threading.Event()

    @app.task()
    def held(n: int) -> int:
        assert gate.wait(10)
        return n

    handles = held.send_many([(n,) for n in range(5)])
    broker = opened(app)
    reads = count_reads(broker, monkeypatch)
    subscriptions: list[Subscription] = []
    real = broker.events_subscription

    def events_subscription() -> Subscription:
        subscriptions.append(real())
        return subscriptions[-1]

    monkeypatch.setattr(broker, "events_subscription", events_subscription)
    with running_worker(app, scheduler=False), ThreadPoolExecutor(5) as pool:
        results = [pool.submit(h.result, 10) for h in handles]  # sync waits: the app's loop
        wait_until(lambda: len(reads) >= 5, what="every wait's first read")
        gate.set()
        assert [r.result(timeout=10) for r in results] == list(range(5))
    assert len(subscriptions) == 1


@pytest.mark.timeout(60)
def test_result_comes_when_the_worker_publishes_no_events(app_factory: AppFactory) -> None:
    """Events are at most once (and a worker may run with them off): the wait reads the job
    again every second, so it is late then, never stuck."""
    producer = app_factory(events=True)
    worker_app = app_factory(share=producer)  # events off: publishes nothing

    @worker_app.task(name="double")
    def double(x: int) -> int:
        return 2 * x

    handle = producer.send_task("double", [21])
    with running_worker(worker_app, scheduler=False):
        assert handle.result(timeout=10) == 42


def test_a_wait_that_times_out_says_what_the_job_is_doing(app_factory: AppFactory) -> None:
    app = app_factory(events=True)

    @app.task()
    def idle() -> None: ...

    with pytest.raises(TimeoutError, match=r"is still queued after 0\.2 s; no worker is consuming"):
        idle.send().result(timeout=0.2)


@pytest.mark.timeout(60)
def test_a_wait_on_a_loop_that_ends_right_after_leaves_nothing_open(
    app_factory: AppFactory,
) -> None:
    """``aresult()`` on a loop of the caller's own (``asyncio.run``), which ends as soon as
    the wait returns: the wait's subscription is closed before it returns. Closed after, it
    was cut short by ``asyncio.run`` cancelling what was left, and its connection was found
    open on a closed loop (a ResourceWarning, an error here) whenever the collector ran
    next, in whichever test ran then."""
    app = app_factory(events=True)

    @app.task()
    def one() -> int:
        return 1

    async def wait_once() -> int:
        return await (await one.asend()).aresult(timeout=10)

    with running_worker(app, scheduler=False):
        for _ in range(3):
            assert asyncio.run(wait_once()) == 1
            gc.collect()  # the warnings of anything left open come now, in this test
