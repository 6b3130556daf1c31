"""Hooks: what each receives, in which order, sync and async, and that a raising hook changes
nothing but a log line."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import pytest

from taskmill import App, Backoff, JobState, JobView, Limit, Retry, current_job
from taskmill.job import ErrorInfo, Job, NewJob
from taskmill.testing import running_worker, wait_until


@pytest.fixture
def app() -> App:
    return App("memory://")


@pytest.mark.timeout(30)
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


@pytest.mark.timeout(30)
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


@pytest.mark.timeout(30)
def test_a_raising_hook_is_logged_and_changes_nothing(
    app: App, caplog: pytest.LogCaptureFixture
) -> None:
    after: list[str] = []

    def broken(job: Job, *rest: Any) -> None:
        raise RuntimeError("hook bug")

    for register in (app.on_enqueue, app.on_start, app.on_retry, app.on_success):
        register(broken)
    app.on_success(lambda job, result: after.append(f"success {result}"))
    app.on_retry(lambda job, error, delay: after.append(f"retry {job.attempt}"))
    tries: list[int] = []

    @app.task(name="once_flaky", retries=1, backoff=Backoff(base=0, cap=0, jitter=False))
    def once_flaky() -> int:
        tries.append(1)
        if len(tries) == 1:
            raise ValueError("first try fails")
        return len(tries)

    with caplog.at_level(logging.ERROR, logger="taskmill.hooks"):
        handle = once_flaky.send()
        app.run_until_idle()
    assert handle.result(timeout=5) == 2  # retried, then succeeded, whatever the hooks did
    assert handle.info().attempt == 2
    assert after == ["retry 1", "success 2"]  # the hooks after the broken one still ran
    logged = [r.getMessage() for r in caplog.records if r.exc_info]
    for name in ("on_enqueue", "on_start", "on_retry", "on_success"):
        assert any(f"{name} hook" in m and handle.id in m and "once_flaky" in m for m in logged), (
            name
        )


@pytest.mark.timeout(30)
def test_a_raising_failure_hook_leaves_the_job_failed(
    app: App, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(job: Job, error: ErrorInfo) -> None:
        raise RuntimeError("hook bug")

    @app.task(retries=0, on_failure=broken)
    def doomed() -> None:
        raise KeyError("gone")

    with caplog.at_level(logging.ERROR, logger="taskmill.hooks"):
        handle = doomed.send()
        app.run_until_idle()
    job = handle.info()
    assert job.state is JobState.FAILED
    assert job.error is not None and job.error.type == "KeyError"
    assert any(
        "on_failure hook" in r.getMessage() and handle.id in r.getMessage() for r in caplog.records
    )


@pytest.mark.timeout(30)
def test_no_hook_for_a_send_that_stored_nothing(app: App) -> None:
    stored: list[str] = []
    app.on_enqueue(lambda job: stored.append(job.id))

    @app.task()
    def once() -> None: ...

    first = once.options(key="k").send()
    again = once.options(key="k").send()
    assert again.existing and stored == [first.id]


@pytest.mark.timeout(30)
def test_hooks_must_be_callables(app: App) -> None:
    with pytest.raises(TypeError, match="on_success hooks must be callables"):
        app.task(on_success=["not callable"])(lambda: None)  # type: ignore[list-item]


@pytest.mark.timeout(30)
def test_on_enqueue_for_send_many_and_send_task(app: App) -> None:
    stored: list[NewJob] = []
    app.on_enqueue(stored.append)

    @app.task(name="square")
    def square(x: int) -> int:
        return x * x

    handles = square.send_many([(1,), (2,), {"x": 3}])
    by_name = app.send_task("square", [4])
    assert [job.id for job in stored] == [h.id for h in [*handles, by_name]]
    assert [job.task for job in stored] == ["square"] * 4
    assert all(isinstance(job, NewJob) for job in stored)


@pytest.mark.timeout(30)
def test_on_retry_gets_the_delay_before_the_next_attempt(app: App) -> None:
    delays: dict[str, float] = {}
    app.on_retry(lambda job, error, delay: delays.__setitem__(error.message, delay))

    @app.task(retries=3, backoff=Backoff(base=60, cap=60, jitter=False))
    def later(asked: float | None) -> None:
        if asked is None:
            raise ValueError("backoff")
        raise Retry(delay=asked, reason="asked")

    by_backoff = later.send(None)
    by_request = later.send(120)
    app.run_until_idle()
    assert by_backoff.status() is JobState.SCHEDULED
    assert by_request.status() is JobState.SCHEDULED
    # the delay asked for, exactly: not what is left of it once the hook runs
    assert delays == {"backoff": 60.0, "asked": 120.0}


@pytest.mark.timeout(30)
def test_on_retry_gets_the_jittered_delay_that_scheduled_the_retry(app: App) -> None:
    got: list[tuple[float, float]] = []
    app.on_retry(lambda job, error, delay: got.append((delay, time.time())))

    @app.task(retries=1, backoff=Backoff(base=60, cap=600, jitter=True))
    def fails() -> None:
        raise ValueError("again")

    handle = fails.send()
    app.run_until_idle()
    [(delay, hook_at)] = got
    assert 30 <= delay <= 60  # jittered: between half the base and all of it
    # the stored retry is that delay after the decision, taken just before the hook
    assert hook_at - 5 < handle.info().run_at - delay <= hook_at


@pytest.mark.timeout(30)
def test_hooks_of_a_sync_task_in_a_running_worker(app: App) -> None:
    events: list[tuple[str, str]] = []

    def on_start(job: Job) -> None:
        events.append(("start", threading.current_thread().name))

    def on_success(job: Job, result: int) -> None:
        events.append((f"success {result}", threading.current_thread().name))

    @app.task(on_start=on_start, on_success=on_success)
    def double(x: int) -> int:
        events.append(("run", threading.current_thread().name))
        return 2 * x

    with running_worker(app):
        assert double.send(21).result(timeout=10) == 42
        wait_until(lambda: len(events) == 3, what="the on_success hook")
    assert [kind for kind, _ in events] == ["start", "run", "success 42"]
    # sync hooks run in threads, never on the worker's event loop thread
    assert all(thread != "taskmill-test-worker" for _, thread in events)


@pytest.mark.timeout(30)
def test_a_timeout_is_a_failure_and_a_cancel_calls_no_outcome_hook() -> None:
    app = App("memory://", heartbeat_s=0.05)
    calls: list[tuple[str, str]] = []
    app.on_start(lambda job: calls.append(("start", job.id)))
    app.on_success(lambda job, result: calls.append(("success", job.id)))
    app.on_retry(lambda job, error, delay: calls.append(("retry", job.id)))
    app.on_failure(lambda job, error: calls.append((f"failure {error.type}", job.id)))
    running = threading.Event()

    @app.task(retries=0)
    async def forever() -> None:
        running.set()
        await asyncio.Event().wait()

    with running_worker(app):
        slow = forever.options(timeout=0.1).send()
        wait_until(lambda: slow.status().finished, what="the timeout")
        assert slow.status() is JobState.FAILED
        running.clear()
        cancelled = forever.send()
        assert running.wait(10)
        cancelled.cancel()
        wait_until(lambda: cancelled.status().finished, what="the cancel")
        assert cancelled.status() is JobState.CANCELLED
    assert calls == [
        ("start", slow.id),
        ("failure taskmill.errors.TaskTimeoutError", slow.id),
        ("start", cancelled.id),
    ]


@pytest.mark.timeout(30)
def test_a_cancel_request_during_an_outcome_hook_changes_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = App("memory://", heartbeat_s=0.05)
    entered, release = threading.Event(), threading.Event()
    finished: list[str] = []

    def slow_hook(job: Job, result: int) -> None:
        entered.set()
        release.wait(10)
        finished.append(job.id)

    @app.task(on_success=slow_hook)
    async def answer() -> int:
        return 42

    with caplog.at_level(logging.INFO, logger="taskmill.worker"), running_worker(app):
        handle = answer.send()
        assert entered.wait(10)
        handle.cancel()  # the job is still running: its outcome is not written yet
        wait_until(
            lambda: any("cancel requested" in r.getMessage() for r in caplog.records),
            what="the worker to see the cancel request",
        )
        release.set()
        assert handle.result(timeout=10) == 42
    assert finished == [handle.id]  # the hook was not cut short either


@pytest.mark.timeout(30)
def test_a_shutdown_during_a_slow_hook_keeps_the_outcome(
    app: App, caplog: pytest.LogCaptureFixture
) -> None:
    entered = threading.Event()

    async def stuck(job: Job, result: int) -> None:
        entered.set()
        await asyncio.Event().wait()

    @app.task(on_success=stuck)
    async def answer() -> int:
        return 42

    with caplog.at_level(logging.WARNING, logger="taskmill.worker"):
        with running_worker(app, drain_timeout_s=0.2):
            handle = answer.send()
            assert entered.wait(10)
        # the worker stopped (past its drain timeout) while the hook was still running
        assert handle.result(timeout=5) == 42
    assert any(
        "hooks cut short" in r.getMessage() and handle.id in r.getMessage() for r in caplog.records
    )


# --- the job a worker's hooks get: a read-only view with the decoded run -----------------------


@pytest.mark.timeout(30)
def test_a_hooks_job_reads_through_to_the_record_and_is_read_only(app: App) -> None:
    views: list[Any] = []
    app.on_start(views.append)

    @app.task(name="mail.send")
    def send_mail(to: str, *, cc: list[str] | None = None) -> None:
        return None

    handle = send_mail.send("ada@example.com", cc=["bob@example.com"])
    app.run_until_idle()
    (view,) = views
    assert isinstance(view, JobView) and isinstance(view.record, Job)
    assert (view.id, view.task, view.state, view.attempt) == (
        handle.id,
        "mail.send",
        JobState.RUNNING,
        1,
    )
    assert view.payload == b'[["ada@example.com"],{"cc":["bob@example.com"]}]'
    assert view.args == ("ada@example.com",) and view.kwargs == {"cc": ["bob@example.com"]}
    assert view.duration_s is None and view.result is None
    with pytest.raises(AttributeError, match="read-only"):
        view.attempt = 5
    with pytest.raises(AttributeError, match="read-only"):
        view.args = ()
    with pytest.raises(TypeError):
        view.kwargs["cc"] = []  # type: ignore[index]
    with pytest.raises(AttributeError):
        _ = view.no_such_field
    assert "ada@example.com" not in repr(view), "arguments may be private: not in reprs"


@pytest.mark.timeout(30)
def test_a_run_decodes_its_arguments_once_for_limits_hooks_and_the_call(app: App) -> None:
    keys: list[Any] = []
    seen: list[Any] = []

    def key(account: UUID, when: datetime) -> str:
        keys.append((type(account), type(when)))
        return str(account)

    @app.task(
        name="ledger.close",
        concurrency=Limit(key=key, max=1),
        on_start=lambda job: seen.append(("start", job.args)),
        on_success=lambda job, result: seen.append(("success", job.args, result)),
    )
    def close(account: UUID, when: datetime) -> datetime:
        seen.append(("call", current_job().args))
        return when

    decodes: list[bytes] = []
    types = close.types
    real = types.arguments

    def counting(payload: bytes) -> tuple[list[Any], dict[str, Any]]:
        decodes.append(payload)
        return real(payload)

    types.arguments = counting  # type: ignore[method-assign]
    account, when = uuid4(), datetime(2024, 5, 1, tzinfo=UTC)
    handle = close.send(account, when)
    decodes.clear()  # the send-time check decoded it once in the producer
    app.run_until_idle()
    assert handle.result(timeout=5) == when
    assert len(decodes) == 1, "decoded once per run"
    assert keys == [(UUID, datetime)], "the limit's key gets the declared types"
    assert seen == [
        ("start", (account, when)),
        ("call", (account, when)),
        ("success", (account, when), when),
    ]
