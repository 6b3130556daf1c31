"""One enqueue pipeline for every job (``taskmill.client``): a periodic tick and a workflow
step publish their ``queued`` event at once and call the ``on_enqueue`` hooks as a send does,
and ``max_depth`` holds for them, each path as documented."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from datetime import UTC, datetime, timedelta

import pytest

from taskmill import App, JobState, QueueFullError, chain
from taskmill.events import Event, subscribe
from taskmill.scheduler import Scheduler

from .conftest import AppFactory

START = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)


@pytest.fixture
def app(app_factory: AppFactory) -> App:
    return app_factory(events=True)


async def _clock() -> float:
    return (START + timedelta(seconds=1)).timestamp()


class Listening:
    """``async with Listening(app) as events:`` subscribed (listening once entered);
    ``await events.next()`` is the next event published, or a failure after 10 s."""

    def __init__(self, app: App) -> None:
        self._ready = asyncio.Event()
        self._stream = subscribe(app, ready=self._ready)
        self._pending: asyncio.Future[Event] | None = None

    async def __aenter__(self) -> Listening:
        self._pending = asyncio.ensure_future(anext(self._stream))  # starts listening
        await self._ready.wait()
        return self

    async def next(self) -> Event:
        pending, self._pending = self._pending, None
        return await asyncio.wait_for(pending or anext(self._stream), 10)

    async def __aexit__(self, *exc: object) -> None:
        if self._pending is not None:
            self._pending.cancel()
            with contextlib.suppress(BaseException):
                await self._pending
        await self._stream.aclose()


@pytest.mark.timeout(60)
def test_a_periodic_tick_publishes_queued_at_once_and_calls_on_enqueue(app: App) -> None:
    hooked: list[tuple[str, str]] = []

    @app.periodic(every=timedelta(minutes=1), name="minutely")
    @app.task(on_enqueue=lambda job: hooked.append(("task", job.id)))
    def report() -> None: ...

    app.on_enqueue(lambda job: hooked.append(("app", job.id)))
    scheduler = Scheduler(app, clock=_clock)

    async def main() -> tuple[Event, list[str]]:
        async with Listening(app) as events:
            report = await scheduler.run_pass()
            return await events.next(), report.enqueued

    event, enqueued = app.run_sync(main())
    tick = f"schedule:minutely:{START.isoformat()}"
    assert enqueued == [tick]
    # published by the scheduler itself: no worker ran, so nothing else could have
    assert (event.job_id, event.state, event.seq) == (tick, "queued", 0)
    assert hooked == [("task", tick), ("app", tick)]


@pytest.mark.timeout(60)
def test_workflow_steps_publish_queued_and_call_on_enqueue(app: App) -> None:
    hooked: list[str] = []

    @app.task(on_enqueue=lambda job: hooked.append(job.id))
    def add(x: int, y: int) -> int:
        return x + y

    async def main() -> tuple[str, dict[str, list[str]]]:
        by_job: dict[str, list[str]] = defaultdict(list)
        async with Listening(app) as events:
            handle = await chain(add.s(1, 2), add.s(10)).asend()
            first = await events.next()  # queued by the send itself: no worker ran yet
            by_job[first.job_id].append(first.state)
            await app.arun_until_idle()  # runs step 0, then step 1, which step 0 released
            while sum(states[-1:] == ["succeeded"] for states in by_job.values()) < 2:
                event = await events.next()
                by_job[event.job_id].append(event.state)
        return handle.id, by_job

    workflow_id, by_job = app.run_sync(main())
    steps = [f"wf:{workflow_id}:0", f"wf:{workflow_id}:1"]
    assert dict(by_job) == {job: ["queued", "running", "succeeded"] for job in steps}
    assert hooked == steps  # the second one by the worker that released it


def test_ticks_of_a_full_queue_are_refused_and_the_others_stored(app: App) -> None:
    app.configure_queue("reports", max_depth=1, when_full="wait", full_timeout_s=30)

    @app.periodic(every=timedelta(minutes=1), name="reports")
    @app.task(queue="reports")
    def report() -> None: ...

    @app.periodic(every=timedelta(minutes=1), name="pings")
    @app.task()
    def ping() -> None: ...

    report.send()  # the queue is full now
    scheduler = Scheduler(app, clock=_clock)
    first = app.run_sync(scheduler.run_pass())  # refused at once: a scheduler never waits
    assert first.refused == [f"schedule:reports:{START.isoformat()}"]
    assert first.enqueued == [f"schedule:pings:{START.isoformat()}"]
    assert app.purge("reports") == 1
    second = app.run_sync(scheduler.run_pass())  # its mark stayed: the tick is still due
    assert (second.enqueued, second.refused) == ([f"schedule:reports:{START.isoformat()}"], [])


def test_a_workflow_into_a_full_queue_stores_nothing(app: App) -> None:
    app.configure_queue("narrow", max_depth=1)

    @app.task(queue="narrow")
    def step(x: int) -> int:
        return x

    step.send(0)
    with pytest.raises(QueueFullError, match="nothing was stored"):
        chain(step.s(1), step.s()).send()
    assert app.list_jobs(limit=10).total == 1
    assert app.run_sync(app.broker.running_workflows(10)) == []


def test_steps_a_workflow_releases_are_not_refused_by_a_full_queue(app: App) -> None:
    """The workflow was accepted when sent; its later steps must not be refused half-way
    (nor may the worker that releases them wait for room in a queue it drains)."""
    app.configure_queue("narrow", max_depth=1, when_full="wait", full_timeout_s=30)

    @app.task()
    def start(x: int) -> int:
        return x + 1

    @app.task(queue="narrow")
    def finish(x: int) -> int:
        return x * 10

    handle = chain(start.s(1), finish.s()).send()
    finish.options(delay=3600).send(0)  # "narrow" is full from now on
    assert app.run_until_idle(["default", "narrow"]) == 2
    assert handle.result(timeout=10) == 20
    assert app.job(f"wf:{handle.id}:1").status() is JobState.SUCCEEDED
