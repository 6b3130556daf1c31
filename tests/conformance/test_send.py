"""Sending jobs: send / asend / send_many / options, and calling a task directly."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import pytest

from taskmill import App, JobState
from taskmill.testing import running_worker

from .helpers import opened


def test_send_and_result_of_sync_task(app: App) -> None:
    @app.task()
    def add(a: int, b: int) -> int:
        return a + b

    with running_worker(app):
        handle = add.send(2, b=3)
        assert handle.result(timeout=10) == 5
    assert handle.existing is False
    assert app.get_job(handle.id).state is JobState.SUCCEEDED


def test_send_and_result_of_async_task(app: App) -> None:
    @app.task()
    async def greet(name: str) -> dict[str, Any]:
        await asyncio.sleep(0)
        return {"hello": name, "n": [1, 2]}

    with running_worker(app):
        assert greet.send("ada").result(timeout=10) == {"hello": "ada", "n": [1, 2]}


async def test_asend_and_aresult(app: App) -> None:
    @app.task()
    async def square(x: int) -> int:
        return x * x

    @app.task()
    def cube(x: int) -> int:
        return x**3

    with running_worker(app):
        h1 = await square.asend(7)
        h2 = await cube.asend(3)
        many = await cube.asend_many([(1,), {"x": 2}])
        assert await h1.aresult(timeout=10) == 49
        assert await h2.aresult(timeout=10) == 27
        assert [await h.aresult(timeout=10) for h in many] == [1, 8]
    assert (await app.aget_job(h1.id)).task == square.name


def test_send_many_tuples_and_mappings_in_one_broker_call(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    @app.task()
    def sub(a: int, b: int = 0) -> int:
        return a - b

    broker = opened(app)
    calls: list[int] = []
    real_enqueue, real_blocking = broker.enqueue, broker.enqueue_blocking

    async def enqueue(jobs: Any, **kwargs: Any) -> Any:
        calls.append(len(jobs))
        return await real_enqueue(jobs, **kwargs)

    def enqueue_blocking(jobs: Any, **kwargs: Any) -> Any:
        result = real_blocking(jobs, **kwargs)
        if result is not None:  # None: this broker has no blocking path, enqueue() follows
            calls.append(len(jobs))
        return result

    monkeypatch.setattr(broker, "enqueue", enqueue)
    monkeypatch.setattr(broker, "enqueue_blocking", enqueue_blocking)
    handles = sub.send_many([(10, 3), {"a": 5, "b": 1}, (4,), {"a": 9}])
    assert calls == [4], "send_many must store the whole batch in one broker call"
    monkeypatch.undo()
    assert len({h.id for h in handles}) == 4
    assert [app.get_job(h.id).state for h in handles] == [JobState.QUEUED] * 4
    with running_worker(app):
        assert [h.result(timeout=10) for h in handles] == [7, 4, 4, 9]
    assert sub.send_many([]) == []


def test_send_many_with_one_bad_item_stores_nothing(app: App) -> None:
    @app.task()
    def one(a: int) -> int:
        return a

    with pytest.raises(TypeError, match="one"):
        one.send_many([(1,), (1, 2), (3,)])
    with pytest.raises(TypeError, match="tuples of positional arguments"):
        one.send_many([5])  # type: ignore[list-item]
    assert app.run_sync(opened(app).list_jobs()) == []


def test_calling_a_task_runs_it_here_and_stores_nothing(app: App) -> None:
    ran: list[int] = []

    @app.task()
    def mul(a: int, b: int) -> int:
        ran.append(a)
        return a * b

    @app.task()
    async def amul(a: int, b: int) -> int:
        return a * b

    assert mul(6, 7) == 42
    assert ran == [6]
    assert asyncio.run(amul(3, 4)) == 12
    assert app.run_sync(opened(app).list_jobs()) == []


def test_options_are_stored(app: App) -> None:
    @app.task(queue="low", priority=1, retries=5, timeout=60)
    def noop() -> None:
        return None

    plain = app.get_job(noop.send().id)
    assert (plain.queue, plain.priority, plain.max_attempts, plain.timeout_s) == ("low", 1, 6, 60)
    assert plain.key is None

    before = time.time()
    h = noop.options(queue="urgent", priority=9, retries=0, timeout=2.5, key="k-1").send()
    job = app.get_job(h.id)
    assert (job.queue, job.priority, job.max_attempts, job.timeout_s, job.key) == (
        "urgent",
        9,
        1,
        2.5,
        "k-1",
    )
    assert job.state is JobState.QUEUED
    assert before - 1 <= job.run_at <= time.time() + 1

    delayed = app.get_job(noop.options(delay=120).send().id)
    assert delayed.state is JobState.SCHEDULED
    assert before + 119 <= delayed.run_at <= time.time() + 121

    when = datetime.fromtimestamp(time.time() + 3600, tz=UTC)
    at = app.get_job(noop.options(run_at=when).send().id)
    assert at.state is JobState.SCHEDULED
    assert at.run_at == pytest.approx(when.timestamp(), abs=0.01)

    # options() returns a copy: the task's own defaults are unchanged
    again = app.get_job(noop.send().id)
    assert (again.queue, again.priority, again.max_attempts) == ("low", 1, 6)


def test_options_queue_routes_to_workers_of_that_queue(app: App) -> None:
    @app.task()
    def where() -> str:
        return "ran"

    urgent = where.options(queue="urgent").send()
    with running_worker(app, queues=["default"]):
        marker = where.send()
        assert marker.result(timeout=10) == "ran"
        assert urgent.status() is JobState.QUEUED
    with running_worker(app, queues=["urgent"]):
        assert urgent.result(timeout=10) == "ran"
