"""Delays and ETAs live in the broker; priority and FIFO order of claims."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import pytest

from taskmill import App, JobState
from taskmill.testing import running_worker

from .helpers import opened


def test_delayed_job_is_scheduled_not_claimed_early_and_runs_after(app: App) -> None:
    started: list[float] = []

    @app.task()
    def later() -> str:
        started.append(time.time())
        return "ran"

    with running_worker(app):  # idle before the send: it must wake for the due time itself
        before = time.time()
        handle = later.options(delay=1.0).send()
        job = app.get_job(handle.id)
        assert job.state is JobState.SCHEDULED
        assert before + 0.99 <= job.run_at <= time.time() + 1.01
        assert handle.result(timeout=10) == "ran"
    assert started[0] >= job.run_at
    assert started[0] - job.run_at < 1.5, "a due job should start promptly on an idle worker"
    done = app.get_job(handle.id)
    assert done.started_at is not None and done.started_at >= job.run_at


def test_future_jobs_are_not_claimable_until_due(app: App) -> None:
    @app.task()
    def later() -> None:
        return None

    broker = opened(app)
    when = datetime.fromtimestamp(time.time() + 3600, tz=UTC)
    at = later.options(run_at=when).send()
    delayed = later.options(delay=3600).send()
    assert app.run_sync(broker.claim(["default"], 10, "w", 5.0)) == []
    assert at.status() is JobState.SCHEDULED and delayed.status() is JobState.SCHEDULED
    past = later.options(run_at=time.time() - 5).send()
    assert past.status() is JobState.QUEUED
    claimed = app.run_sync(broker.claim(["default"], 10, "w", 5.0))
    assert [j.id for j in claimed] == [past.id]


def test_delay_survives_a_worker_restart(app: App) -> None:
    """The ETA is the broker's: a worker that stops before it is due keeps nothing."""

    @app.task()
    def eta() -> str:
        return "ok"

    handle = eta.options(delay=1.0).send()
    with running_worker(app):
        pass  # a worker comes and goes before the job is due
    assert handle.status() is JobState.SCHEDULED
    with running_worker(app):
        assert handle.result(timeout=10) == "ok"


def test_priority_then_run_at_then_enqueue_order(app: App) -> None:
    order: list[str] = []

    @app.task()
    def note(label: str) -> None:
        order.append(label)

    now = time.time()
    note.options(priority=0).send("p0-a")
    note.options(priority=5).send("p5-a")
    note.options(priority=0).send("p0-b")
    note.options(priority=-3).send("low")
    note.options(priority=5).send("p5-b")
    note.options(priority=0, run_at=now - 60).send("p0-older-run_at")
    note.options(priority=10).send_many([("p10-a",), ("p10-b",)])
    note.options(priority=5, run_at=now - 30).send("p5-older-run_at")
    with running_worker(app, concurrency=1):
        last = note.options(priority=-10).send("last")
        last.result(timeout=10)
    assert order == [
        "p10-a",
        "p10-b",
        "p5-older-run_at",
        "p5-a",
        "p5-b",
        "p0-older-run_at",
        "p0-a",
        "p0-b",
        "low",
        "last",
    ]


def test_priority_across_queues(app: App) -> None:
    order: list[str] = []

    @app.task()
    def note(label: str) -> None:
        order.append(label)

    note.options(queue="a", priority=1).send("a1")
    note.options(queue="b", priority=3).send("b3")
    note.options(queue="a", priority=2).send("a2")
    note.options(queue="b", priority=1).send("b1")
    with running_worker(app, queues=["a", "b"], concurrency=1):
        note.options(queue="a", priority=-1).send("end").result(timeout=10)
    assert order == ["b3", "a2", "a1", "b1", "end"]


def test_claim_takes_at_most_limit_in_order(app: App) -> None:
    @app.task()
    def noop() -> None:
        return None

    broker = opened(app)
    low = noop.send_many([(), ()])
    high = noop.options(priority=1).send()
    first = app.run_sync(broker.claim(["default"], 2, "w", 5.0))
    assert [j.id for j in first] == [high.id, low[0].id]
    assert all(j.state is JobState.RUNNING and j.attempt == 1 for j in first)
    assert all(j.worker_id == "w" and j.lease_token for j in first)
    second = app.run_sync(broker.claim(["default"], 2, "w", 5.0))
    assert [j.id for j in second] == [low[1].id]
    assert app.run_sync(broker.claim(["default"], 2, "w", 5.0)) == []


@pytest.mark.timeout(30)
def test_worker_claims_no_more_than_its_free_slots(app: App) -> None:
    release = threading.Event()
    running = threading.Semaphore(0)

    @app.task()
    def hold() -> None:
        running.release()
        assert release.wait(20)

    handles = hold.send_many([()] * 5)
    with running_worker(app, concurrency=2):
        assert running.acquire(timeout=10) and running.acquire(timeout=10)
        states = [h.status() for h in handles]
        assert states.count(JobState.RUNNING) == 2
        assert states.count(JobState.QUEUED) == 3, "a busy worker must not hoard jobs"
        release.set()
        for h in handles:
            h.result(timeout=10)
