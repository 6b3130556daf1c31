"""The ``LimitStore`` feature (``taskmill.brokers.features``), through flow control.

Flow control through the broker: rate limits hold across worker processes, a queue's depth
limit refuses (or waits), and the broker's rate slots are spaced as asked."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path

import pytest

from taskmill import App, ConfigurationError, JobState, Limit, QueueFullError
from taskmill.brokers.features import limit_store
from taskmill.testing import await_until, running_worker

from .apps import build_app, create_starts_table, starts
from .conftest import AppFactory
from .helpers import opened, processes, subprocess_env, wait_until, worker_args


def test_rate_slots_are_reserved_one_interval_apart(app: App) -> None:
    broker = limit_store(opened(app))

    async def reserve() -> list[float]:
        return [await broker.reserve_rate_slot("task:t", 0.1) for _ in range(5)]

    waits = app.run_sync(reserve())
    # each reservation is 0.1 s after the previous, less the time between the two calls
    assert waits[0] == pytest.approx(0.0, abs=0.05)
    for earlier, later in itertools.pairwise(waits):
        assert 0.0 < later - earlier <= 0.1 + 1e-6
    other = app.run_sync(broker.reserve_rate_slot("task:other", 0.1))
    assert other == pytest.approx(0.0, abs=0.05)  # buckets are independent


@pytest.mark.timeout(60)
def test_a_full_queue_refuses_and_stores_nothing(app: App) -> None:
    app.configure_queue("small", max_depth=3)

    @app.task(queue="small")
    def job(n: int) -> int:
        return n

    job.send_many([(1,), (2,)])
    with pytest.raises(QueueFullError, match="queue 'small' holds 2 waiting jobs"):
        job.send_many([(3,), (4,)])
    job.send(3)
    with pytest.raises(QueueFullError, match="max_depth is 3"):
        job.send(4)
    assert len(app.run_sync(opened(app).list_jobs())) == 3
    with running_worker(app, scheduler=False):
        app.run_sync(_until_drained(app, "small"))
        assert job.send(5).result(timeout=10) == 5  # room again once the queue drained


async def _until_drained(app: App, queue: str) -> None:
    broker = limit_store(await app.abroker())

    async def drained() -> bool:
        return await broker.queue_depth(queue) == 0

    await await_until(drained, timeout=20, interval=0.01, what=f"queue {queue} to drain")


@pytest.mark.timeout(60)
def test_a_full_queue_can_wait_for_room(app: App) -> None:
    app.configure_queue("small", max_depth=1, when_full="wait", full_timeout_s=20)
    release = threading.Event()

    @app.task(queue="small")
    def gated(n: int) -> int:
        assert release.wait(20)
        return n

    first = gated.send(1)
    second_sent = threading.Event()

    def send_second() -> None:
        gated.send(2)
        second_sent.set()

    sender = threading.Thread(target=send_second, daemon=True)
    sender.start()
    assert not second_sent.wait(0.3)  # blocked: the queue is full and nothing takes jobs
    with running_worker(app, scheduler=False):
        assert second_sent.wait(20)  # the worker took the first job: there is room
        release.set()
        assert first.result(timeout=10) == 1
    sender.join(10)
    assert JobState.SUCCEEDED in {j.state for j in app.run_sync(opened(app).list_jobs())}


def test_bad_limits_are_refused() -> None:
    app = App("memory://")
    for rate in ("10", "ten/s", "0/s", "5/d"):
        with pytest.raises(ConfigurationError, match="rate_limit must look like"):
            app.task(rate_limit=rate)
    with pytest.raises(ConfigurationError, match="max_depth must be"):
        app.configure_queue("q", max_depth=0)


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_a_rate_limit_holds_across_two_worker_processes(broker_url: str, tmp_path: Path) -> None:
    """200 jobs at "50/s" sent to 2 running worker processes: both run some, and however
    late a worker wakes up, by any moment ``t`` after the send at most ``1 + 50 * t`` of them
    have started (at most 200 in 3.98 s: the rate limit, with no burst, across processes).

    Why not "no window of 0.9 s holds more than 50 starts", as this test said before: the
    broker spaces the reserved starts, and a job starts when its worker wakes up, after its
    reserved time. On a loaded machine a worker that wakes late starts its jobs in a bunch
    behind jobs that started on time: up to 55 starts in 0.9 s on Redis and 63 on NATS were
    seen (in 12 runs each, load average 15 on 2 cores). A late start cannot make more jobs
    start by a moment than were reserved by then, so this bound holds whatever the delays;
    a limit counted per process breaks it within the first second (seen: start 30 at 0.6 s)."""
    db = tmp_path / "starts.db"
    create_starts_table(db)
    app = build_app(broker_url)
    env = subprocess_env(broker_url, {})
    try:
        task = app.tasks["conformance.rate_limited"]
        with processes() as start:
            procs = [
                start(worker_args(concurrency=16), env, tmp_path / f"worker-{i}.log")
                for i in range(2)
            ]
            wait_until(
                lambda: len(app.workers()) == 2,
                timeout=60,
                what=lambda: f"2 workers registered: {[p.output() for p in procs]}",
            )
            sent_at = time.time()  # no start can be reserved before it
            task.send_many([(str(db),)] * 200)
            wait_until(
                lambda: len(starts(db)) >= 200,
                timeout=60,
                interval=0.05,
                what=lambda: f"200 starts: {[p.output() for p in procs]}",
            )
    finally:
        app.close()
    rows = starts(db)
    assert len({pid for _, pid in rows}) == 2, "one worker process ran every job"
    # the k-th start (from 0) comes k intervals after the send at the earliest; 1 ms of
    # slack for the rounding of the broker's clock
    interval, slack = 1 / 50, 0.001
    early = [
        (k, round(at - sent_at, 4))
        for k, (at, _) in enumerate(rows)
        if at < sent_at + k * interval - slack
    ]
    assert not early, f"starts too early (k, seconds after the send): {early[:10]}"


def test_concurrency_slots_are_held_refreshed_released_and_expire(app: App) -> None:
    broker = limit_store(opened(app))
    run = app.run_sync
    assert run(broker.acquire_slot("b", "job-a", 2, 30.0))
    assert run(broker.acquire_slot("b", "job-b", 2, 30.0))
    assert not run(broker.acquire_slot("b", "job-c", 2, 30.0))  # both slots held
    assert run(broker.acquire_slot("b", "job-a", 2, 30.0))  # a holder refreshes its own
    assert run(broker.acquire_slot("other", "job-c", 2, 30.0))  # buckets are independent
    run(broker.release_slot("b", "job-a"))
    assert run(broker.acquire_slot("b", "job-c", 2, 30.0))
    assert not run(broker.acquire_slot("b", "job-d", 2, 30.0))
    assert run(broker.acquire_slot("short", "job-e", 1, 0.2))
    # a holder that stops refreshing (its worker died) loses the slot once it expires
    wait_until(lambda: run(broker.acquire_slot("short", "job-f", 1, 30.0)), timeout=10,
               what="the expired slot to be free")  # fmt: skip


@pytest.mark.timeout(60)
def test_a_concurrency_limit_is_never_exceeded_across_workers(app_factory: AppFactory) -> None:
    """Two workers, 8 slots each, 12 jobs for 3 users with max=1 per user: never two of one
    user's jobs at once, every job succeeded on its first attempt."""
    first = app_factory()
    second = app_factory(share=first)
    lock = threading.Lock()
    running: dict[int, int] = {}
    most: dict[int, int] = {}

    for app in (first, second):

        @app.task(name="feeds.rebuild", concurrency=Limit(key=lambda user, **_: user, max=1))
        def rebuild(user: int, n: int) -> int:
            with lock:
                running[user] = running.get(user, 0) + 1
                most[user] = max(most.get(user, 0), running[user])
            time.sleep(0.05)  # the job's work: long enough for others to overlap it
            with lock:
                running[user] -= 1
            return n

    handles = first.tasks["feeds.rebuild"].send_many([(n % 3, n) for n in range(12)])
    with running_worker(first, scheduler=False), running_worker(second, scheduler=False):
        assert sorted(h.result(timeout=30) for h in handles) == list(range(12))
    assert most == {0: 1, 1: 1, 2: 1}
    assert {first.get_job(h.id).attempt for h in handles} == {1}
