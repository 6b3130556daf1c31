"""Hooks: what each receives, in which order, sync and async, and that a raising hook changes
nothing but a log line."""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest

from taskmill import App, Backoff, JobState
from taskmill.job import ErrorInfo, Job, NewJob


@pytest.fixture
def app() -> App:
    return App("memory://")


def test_each_hook_gets_the_job_and_what_happened(app: App) -> None:
    calls: list[tuple[Any, ...]] = []
    app.on_enqueue(lambda job: calls.append(("enqueue", type(job), job.task)))
    app.on_start(lambda job: calls.append(("start", job.state, job.attempt)))
    app.on_success(lambda job, result: calls.append(("success", job.id, result)))
    app.on_retry(lambda job, error, delay: calls.append(("retry", job.attempt, error, delay)))
    app.on_failure(lambda job, error: calls.append(("failure", job.attempt, error)))
    tries = {"n": 0}

    @app.task(name="flaky", retries=1, backoff=Backoff(base=0, cap=0, jitter=False))
    def flaky(fail_times: int) -> str:
        tries["n"] += 1
        if tries["n"] <= fail_times:
            raise ValueError(f"try {tries['n']}")
        return "ok"

    ok = flaky.send(1)
    app.run_until_idle()
    assert ok.result(timeout=5) == "ok"
    tries["n"] = 0
    failed = flaky.send(5)
    app.run_until_idle()
    assert failed.status() is JobState.FAILED

    assert calls[0] == ("enqueue", NewJob, "flaky")
    assert calls[1] == ("start", JobState.RUNNING, 1)
    kind, attempt, error, delay = calls[2]
    assert (kind, attempt) == ("retry", 1)
    assert isinstance(error, ErrorInfo) and error.message == "try 1" and delay == 0.0
    assert calls[3] == ("start", JobState.RUNNING, 2)
    assert calls[4] == ("success", ok.id, "ok")
    assert [c[0] for c in calls[5:]] == ["enqueue", "start", "retry", "start", "failure"]
    assert calls[-1][1] == 2 and calls[-1][2].type == "ValueError"


def test_task_hooks_run_before_app_hooks_each_in_registration_order(app: App) -> None:
    order: list[str] = []
    app.on_success(lambda job, result: order.append("app 1"))
    app.on_success(lambda job, result: order.append("app 2"))

    async def task_async(job: Job, result: int) -> None:
        order.append("task async")

    @app.task(on_success=[lambda job, result: order.append("task sync"), task_async])
    def add(a: int, b: int) -> int:
        return a + b

    add.send(1, 2)
    app.run_until_idle()
    assert order == ["task sync", "task async", "app 1", "app 2"]


@pytest.mark.timeout(30)
async def test_async_hooks_on_asend_and_sync_hooks_off_the_event_loop(app: App) -> None:
    seen: list[str] = []
    threads: list[bool] = []

    async def on_enqueue(job: NewJob) -> None:
        seen.append(f"enqueued {job.task}")

    def on_start(job: Job) -> None:  # sync: run in a thread, not on the worker's loop
        threads.append(threading.current_thread() is threading.main_thread())

    app.on_enqueue(on_enqueue)
    app.on_start(on_start)

    @app.task(name="noop")
    async def noop() -> None:
        return None

    handle = await noop.asend()
    await app.arun_until_idle()
    assert await handle.astatus() is JobState.SUCCEEDED
    assert seen == ["enqueued noop"] and threads == [False]


def test_a_raising_hook_is_logged_and_changes_nothing(
    app: App, caplog: pytest.LogCaptureFixture
) -> None:
    after: list[str] = []

    def broken(job: Job, *rest: Any) -> None:
        raise RuntimeError("hook bug")

    app.on_success(broken)
    app.on_success(lambda job, result: after.append("ran"))
    app.on_retry(broken)
    app.on_enqueue(broken)

    @app.task(retries=1, backoff=Backoff(base=0, cap=0, jitter=False))
    def once_flaky(state: list[int]) -> int:
        return 1

    with caplog.at_level(logging.ERROR, logger="taskmill.hooks"):
        handle = once_flaky.send([])
        app.run_until_idle()
    assert handle.result(timeout=5) == 1  # succeeded, whatever the hooks did
    assert after == ["ran"]  # the hooks after the broken one still ran
    messages = [r.getMessage() for r in caplog.records]
    assert any("on_success hook" in m and handle.id in m for m in messages)
    assert any("on_enqueue hook" in m and handle.id in m for m in messages)


def test_no_hook_for_a_send_that_stored_nothing(app: App) -> None:
    stored: list[str] = []
    app.on_enqueue(lambda job: stored.append(job.id))

    @app.task()
    def once() -> None: ...

    first = once.options(key="k").send()
    again = once.options(key="k").send()
    assert again.existing and stored == [first.id]


def test_hooks_must_be_callables(app: App) -> None:
    with pytest.raises(TypeError, match="on_success hooks must be callables"):
        app.task(on_success=["not callable"])(lambda: None)  # type: ignore[list-item]
