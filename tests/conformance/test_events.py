"""The ``EventBus`` feature (``taskmill.brokers.features``), through live events.

Live events on every broker: a job's transitions and progress in order, filters, and a
subscriber in another process that sees every transition of 1,000 jobs in order per job."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from pathlib import Path

import msgspec
import pytest

from taskmill import App, Backoff, current_job
from taskmill.events import Event
from taskmill.testing import running_worker

from .apps import build_app
from .conftest import AppFactory
from .helpers import PACKAGE, processes, subprocess_env, wait_until, worker_args


@pytest.fixture
def app(app_factory: AppFactory) -> App:
    return app_factory(events=True)


@pytest.mark.timeout(60)
def test_watch_yields_each_transition_and_progress_in_order(app: App) -> None:
    tries = {"n": 0}

    @app.task(retries=1, backoff=Backoff(base=0, cap=0, jitter=False))
    def steps(n: int) -> str:
        tries["n"] += 1
        if tries["n"] == 1:
            raise ValueError("first try fails")
        job = current_job()
        for i in range(n):
            job.progress((i + 1) / n, f"step {i + 1}")
            time.sleep(0.15)  # slower than the 10-per-second coalescing: each step is seen
        return "done"

    handle = steps.send(3)
    events = handle.watch()
    first = next(events)
    assert (first.state, first.seq) == ("queued", 0)
    with running_worker(app, scheduler=False):
        seen = [first, *events]
    states = [e.state for e in seen if e.progress is None and not e.message]
    assert states == ["queued", "running", "queued", "running", "succeeded"]
    assert [e.seq for e in seen] == sorted(e.seq for e in seen)
    progress = [e.progress for e in seen if e.progress is not None]
    assert progress == sorted(progress) and progress[-1] == pytest.approx(1.0)
    assert seen[-1].attempt == 2 and seen[-1].finished


@pytest.mark.timeout(60)
def test_events_filter_by_queue_and_workflow(app: App) -> None:
    from taskmill import chain

    @app.task(queue="watched")
    def watched(x: int) -> int:
        return x

    @app.task(queue="other")
    def other(x: int) -> int:
        return x

    async def collect() -> tuple[list[Event], list[Event]]:
        import asyncio

        by_queue: list[Event] = []
        by_flow: list[Event] = []
        ready_q, ready_w = asyncio.Event(), asyncio.Event()
        from taskmill.events import subscribe

        flow_id: list[str] = []

        async def take(stream, sink, until) -> None:  # type: ignore[no-untyped-def]
            async for event in stream:
                sink.append(event)
                if until(sink):
                    return

        queue_task = asyncio.ensure_future(
            take(subscribe(app, queue="watched", ready=ready_q), by_queue,
                 lambda s: sum(e.finished for e in s) >= 2)
        )  # fmt: skip
        await ready_q.wait()
        await watched.asend(1)
        await other.asend(2)
        handle = await chain(watched.s(5), watched.s()).asend()
        flow_id.append(handle.id)
        flow_task = asyncio.ensure_future(
            take(subscribe(app, workflow_id=handle.id, ready=ready_w), by_flow,
                 lambda s: sum(e.finished for e in s) >= 2)
        )  # fmt: skip
        await ready_w.wait()
        await app.arun_until_idle()
        await asyncio.wait_for(asyncio.gather(queue_task, flow_task), 20)
        return by_queue, by_flow

    by_queue, by_flow = app.run_sync(collect())
    assert {e.queue for e in by_queue} == {"watched"}
    assert {e.workflow_id for e in by_flow} == {by_flow[0].workflow_id} != {None}


@pytest.mark.multiprocess
@pytest.mark.timeout(180)
def test_a_subscriber_in_another_process_sees_every_transition_in_order(
    broker_url: str, tmp_path: Path
) -> None:
    settings = {"events": True}
    env = subscriber_env = subprocess_env(broker_url, settings)
    ready, out = tmp_path / "ready", tmp_path / "events.jsonl"
    app = build_app(broker_url, **settings)
    try:
        with processes() as start:
            subscriber = start(
                ["-m", f"{PACKAGE}.subscriber_main", str(ready), str(out), "1000"],
                subscriber_env,
                tmp_path / "subscriber.log",
            )
            wait_until(ready.exists, timeout=30, what="the subscriber to listen")
            handles = app.tasks["conformance.double"].send_many([(n,) for n in range(1000)])
            start(worker_args(concurrency=16), env, tmp_path / "worker.log")
            assert subscriber.wait(120) == 0, subscriber.output()
    finally:
        app.close()
    per_job: dict[str, list[str]] = defaultdict(list)
    for line in out.read_bytes().splitlines():
        event = msgspec.json.decode(line, type=Event)
        per_job[event.job_id].append(event.state)
    assert set(per_job) == {h.id for h in handles}
    wrong = {job: states for job, states in per_job.items()
             if states != ["queued", "running", "succeeded"]}  # fmt: skip
    assert wrong == {}


@pytest.mark.timeout(60)
def test_last_progress_event_comes_before_the_outcome(app: App) -> None:
    """Reports made just before a job returns reach subscribers, before its ``succeeded``."""

    @app.task()
    def stepper(i: int) -> int:
        job = current_job()
        for step in range(1, 5):
            job.progress(step / 4, f"step {step}")
        return i

    ids: list[str] = []
    seen: dict[str, list[Event]] = defaultdict(list)

    async def main() -> None:
        import asyncio

        from taskmill.events import subscribe

        ready, arrived = asyncio.Event(), asyncio.Event()

        async def collect() -> None:
            async for event in subscribe(app, ready=ready):
                seen[event.job_id].append(event)
                arrived.set()

        listener = asyncio.create_task(collect())
        await ready.wait()
        ids.extend([(await stepper.asend(i)).id for i in range(20)])
        # judged here, not in collect(): every job may finish before the last send returns,
        # and then no event comes after the ids are known
        try:
            async with asyncio.timeout(30):
                while True:
                    arrived.clear()
                    if all(any(e.finished for e in seen[i]) for i in ids):
                        break
                    await arrived.wait()
        finally:
            listener.cancel()

    with running_worker(app, scheduler=False):
        app.run_sync(main())
    for job_id in ids:
        events = seen[job_id]
        last_progress = [e for e in events if e.progress is not None][-1]
        assert (last_progress.progress, last_progress.message) == (1.0, "step 4")
        assert events.index(last_progress) < [e.state for e in events].index("succeeded")


@pytest.mark.timeout(60)
def test_watch_ends_on_the_stored_outcome_when_the_finishing_event_is_lost(
    app: App, app_factory: AppFactory
) -> None:
    """Events are at most once (a reconnect loses what was published meanwhile). Here the
    worker's app has events off, so neither its ``running`` nor its outcome is published:
    the watch still ends, on the job record, with the event it missed."""
    quiet = app_factory(share=app, events=False)

    def fails(x: int) -> int:
        raise ValueError(f"no {x}")

    watched = app.task(name="fails", retries=0)(fails)
    quiet.task(name="fails", retries=0)(fails)
    handle = watched.send(7)
    events = handle.watch()
    assert next(events).state == "queued"
    seen: list[Event] = []
    follower = threading.Thread(target=lambda: seen.extend(events), daemon=True)
    with running_worker(quiet, scheduler=False):
        follower.start()
        follower.join(20)  # the job fails at once; the watch reads it again every second
    assert not follower.is_alive(), "the watch waits for an event that will never come"
    assert [(e.state, e.attempt, e.seq, e.finished) for e in seen] == [("failed", 1, 2, True)]
    assert seen[0].job_id == handle.id and seen[0].task == "fails"
