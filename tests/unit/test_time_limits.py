"""Soft and hard time limits on the memory broker: validation, how a per-send soft limit is
stored, and what async tasks and the thread pool see at each limit. The process pool's side is
in tests/integration/test_process_pool.py; outcomes on every broker in the conformance suite."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from taskmill import (
    App,
    ConfigurationError,
    JobFailedError,
    JobState,
    SoftTimeLimitExceeded,
    current_job,
)
from taskmill.brokers.memory import MemoryBroker
from taskmill.context import JobContext
from taskmill.errors import SerializationError, TaskTimeoutError
from taskmill.serialization import decode_payload, payload_options
from taskmill.testing import running_worker, wait_until
from taskmill.worker.pools import call_async

pytestmark = pytest.mark.timeout(30)

# Retries wait longer than a heartbeat's round trip: a heartbeat still carrying the first
# attempt's claim can report the job lost by its id, which stops the second attempt if the
# same worker claimed it meanwhile (a worker race outside time limits).
RETRY_AFTER_S = 0.5


@pytest.fixture
def app() -> Iterator[App]:
    app = App("memory://", heartbeat_s=0.05)
    yield app
    app.close()


def noop() -> None:
    return None


def failure(app: App, job_id: str) -> JobFailedError:
    with pytest.raises(JobFailedError) as info:
        app.job(job_id).result(timeout=20)
    return info.value


# --- validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"soft_timeout": 60, "timeout": 60},
            r"task 't': soft_timeout \(60 s\) must be less than timeout \(60 s\): the soft "
            "limit warns the task before the hard one stops it$",
        ),
        (
            {"soft_timeout": timedelta(minutes=2), "timeout": 90},
            r"task 't': soft_timeout \(120 s\) must be less than timeout \(90 s\)",
        ),
        ({"soft_timeout": 0}, "task 't': soft_timeout must be more than 0 seconds, not 0"),
        ({"soft_timeout": -1}, "soft_timeout must be a non-negative number of seconds, not -1"),
    ],
)
def test_invalid_time_limits_of_a_task(app: App, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=f"^{message}"):
        app.task(name="t", **options)(noop)
    assert app.tasks == {}


def test_a_soft_limit_alone_or_before_the_hard_one_is_stored_on_the_task(app: App) -> None:
    both = app.task(name="both", soft_timeout=50, timeout=timedelta(minutes=1))(noop)
    assert (both.defaults.soft_timeout_s, both.defaults.timeout_s) == (50.0, 60.0)
    alone = app.task(name="alone", soft_timeout=5)(noop)
    assert (alone.defaults.soft_timeout_s, alone.defaults.timeout_s) == (5.0, None)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"timeout": 30}, r"task 't': soft_timeout \(50 s\) must be less than timeout \(30 s\)"),
        (
            {"soft_timeout": 70},
            r"task 't': soft_timeout \(70 s\) must be less than timeout \(60 s\)",
        ),
        ({"soft_timeout": 0}, "task 't': soft_timeout must be more than 0 seconds, not 0"),
    ],
)
def test_a_send_may_not_put_the_soft_limit_at_or_past_the_hard_one(
    app: App, options: dict[str, Any], message: str
) -> None:
    t = app.task(name="t", soft_timeout=50, timeout=60)(noop)
    with pytest.raises(ConfigurationError, match=f"^{message}"):
        t.options(**options)
    both = t.options(soft_timeout=20, timeout=30).opts
    assert (both.soft_timeout_s, both.timeout_s) == (20.0, 30.0)


# --- where a per-send soft limit is stored -----------------------------------------------


def test_only_a_send_that_changes_the_soft_limit_stores_it_after_the_arguments(
    app: App,
) -> None:
    t = app.task(name="t", soft_timeout=50, timeout=60)(lambda x: x)
    plain = app.get_job(t.send(1).id).payload
    same = app.get_job(t.options(soft_timeout=50).send(1).id).payload
    changed = app.get_job(t.options(soft_timeout=2.5).send(1).id).payload
    assert plain == same == b"[[1],{}]"
    assert changed == b'[[1],{},{"soft_timeout_s":2.5}]'
    assert decode_payload(changed) == ([1], {})
    assert (payload_options(plain), payload_options(changed)) == ({}, {"soft_timeout_s": 2.5})
    by_name = app.send_task(
        "elsewhere.task", [1], soft_timeout=3, external=True
    )  # not registered here
    assert app.get_job(by_name.id).payload == b'[[1],{},{"soft_timeout_s":3.0}]'


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"[[],{},5]", "stored payload's third item must be a JSON object of job options, not 5"),
        (b'[[],{},{"soft_timeout_s":0}]', "stored soft_timeout_s must be a number of seconds"),
        (b'[[],{},{"soft_timeout_s":"9"}]', "stored soft_timeout_s must be a number of seconds"),
        (b"[[],{},{},{}]", r"stored payload is not a JSON \[args, kwargs\] pair"),
    ],
)
def test_a_malformed_options_item_is_a_serialization_error(payload: bytes, message: str) -> None:
    with pytest.raises(SerializationError, match=f"^{message}"):
        decode_payload(payload)
    if payload.count(b",") == 2:  # three items: the options' reader checks them as well
        with pytest.raises(SerializationError, match=f"^{message}"):
            payload_options(payload)


def test_a_job_with_malformed_options_fails_at_once(app: App) -> None:
    @app.task(name="t", retries=3)
    async def t() -> None:
        return None

    handle = t.send()
    broker = app.broker
    assert isinstance(broker, MemoryBroker)
    with broker._lock:  # as another producer could have written it
        broker._jobs[handle.id].payload = b'[[],{},{"soft_timeout_s":-2}]'
    app.run_until_idle()
    error = failure(app, handle.id)
    assert error.type == "taskmill.errors.SerializationError"
    assert error.message == "stored soft_timeout_s must be a number of seconds above 0, not -2"
    assert app.get_job(handle.id).attempt == 1


def test_options_of_unknown_names_are_accepted_for_later_versions() -> None:
    assert decode_payload(b'[[1],{"a":2},{"later":true}]') == ([1], {"a": 2})


# --- async tasks -------------------------------------------------------------------------


def test_an_async_task_catches_the_soft_limit_cleans_up_and_returns(app: App) -> None:
    seen: list[Any] = []

    @app.task(soft_timeout=0.2, timeout=20, retries=0)
    async def export() -> str:
        try:
            await asyncio.Event().wait()
        except SoftTimeLimitExceeded as exc:
            job = current_job()
            seen.append((str(exc), job.soft_limit_exceeded, job.cancelled))
            await asyncio.sleep(0.01)  # cleanup may still await
            return "partial export"
        return "never"

    started = time.monotonic()
    handle = export.send()
    app.run_until_idle()
    assert handle.result(timeout=5) == "partial export"
    assert time.monotonic() - started < 10
    name = export.name
    assert seen == [(f"task {name} exceeded its soft time limit of 0.2 s", True, True)]


def test_an_async_task_that_ignores_the_soft_limit_is_cancelled_at_the_hard_one(
    app: App,
) -> None:
    events: list[str] = []

    @app.task(soft_timeout=0.1, timeout=0.5, retries=0)
    async def stubborn() -> None:
        try:
            await asyncio.sleep(30)
        except SoftTimeLimitExceeded:
            events.append("soft")
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            events.append("hard")
            raise

    handle = stubborn.send()
    app.run_until_idle()
    error = failure(app, handle.id)
    assert error.type == "taskmill.errors.TaskTimeoutError"
    assert error.message == (
        f"task {stubborn.name} timed out after 0.5 s (its hard time limit); it was cancelled"
    )
    assert events == ["soft", "hard"]


def test_a_soft_limit_raised_out_of_the_task_is_retried_by_its_policy(app: App) -> None:
    @app.task(soft_timeout=0.1, timeout=10, retries=1, backoff=RETRY_AFTER_S)
    async def slow() -> None:
        await asyncio.sleep(30)

    @app.task(soft_timeout=0.1, retries=3, dont_retry_on=SoftTimeLimitExceeded)
    async def slow_once() -> None:
        await asyncio.sleep(30)

    with running_worker(app):
        retried, once = slow.send(), slow_once.send()
        error = failure(app, retried.id)
        once_error = failure(app, once.id)
    assert error.type == "taskmill.errors.SoftTimeLimitExceeded"
    assert error.message == f"task {slow.name} exceeded its soft time limit of 0.1 s"
    assert "await asyncio.sleep(30)" in error.traceback  # raised where the task waited
    assert app.get_job(retried.id).attempt == 2
    assert once_error.type == "taskmill.errors.SoftTimeLimitExceeded"
    assert app.get_job(once.id).attempt == 1


def test_a_cancel_after_the_soft_limit_still_cancels_the_job(app: App) -> None:
    caught = threading.Event()

    @app.task(soft_timeout=0.1)
    async def lingering() -> None:
        try:
            await asyncio.sleep(30)
        except SoftTimeLimitExceeded:
            caught.set()
            await asyncio.sleep(30)

    with running_worker(app):
        handle = lingering.send()
        assert caught.wait(10)
        assert handle.cancel() is JobState.RUNNING
        wait_until(lambda: handle.status() is JobState.CANCELLED, what="the job to be cancelled")


def test_a_cancel_that_arrives_with_the_soft_limit_is_not_turned_into_it(app: App) -> None:
    """The worker's cancel (a stop, a lost lease) in the same instant as the soft limit: the
    coroutine gets the ``CancelledError``, so the worker's interrupt is not swallowed."""
    seen: list[str] = []

    @app.task(name="both")
    async def both() -> None:
        try:
            await asyncio.sleep(30)
        except SoftTimeLimitExceeded:
            seen.append("soft")
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    class CancelledToo(JobContext):
        def _pass_soft_limit(self) -> None:
            super()._pass_soft_limit()
            tasks[0].cancel()  # someone else's cancel, just before the soft limit's own

    ctx = CancelledToo("id", "both", "default", 1, 1, _report=lambda *_: None)
    tasks: list[asyncio.Task[Any]] = []

    async def main() -> None:
        tasks.append(asyncio.create_task(call_async(both, [], {}, ctx, None, 0.05)))
        with pytest.raises(asyncio.CancelledError):
            await tasks[0]

    asyncio.run(main())
    assert seen == ["cancelled"]
    assert ctx.soft_limit_exceeded


def test_an_async_task_under_a_soft_limit_runs_as_it_would_without_one(app: App) -> None:
    @app.task(name="busy")
    async def busy(n: int) -> list[int]:
        async def one(i: int) -> int:
            await asyncio.sleep(0)
            return i * i

        squares = await asyncio.gather(*(one(i) for i in range(n)))
        queue: asyncio.Queue[int] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        loop.call_soon(queue.put_nowait, 99)
        squares.append(await queue.get())
        try:
            await asyncio.wait_for(asyncio.sleep(30), 0.01)
        except TimeoutError:
            squares.append(-1)
        if n == 0:
            raise LookupError("none")
        return squares

    ctx = JobContext("id", "busy", "default", 1, 1, _report=lambda *_: None)
    assert asyncio.run(call_async(busy, [3], {}, ctx, 10, 5)) == [0, 1, 4, 99, -1]
    with pytest.raises(LookupError, match="none"):
        asyncio.run(call_async(busy, [0], {}, ctx, 10, 5))
    assert not ctx.soft_limit_exceeded and not ctx.cancelled


# --- the thread pool ---------------------------------------------------------------------


def test_a_sync_task_in_the_thread_pool_sees_the_soft_limit_as_flags(app: App) -> None:
    @app.task(soft_timeout=0.2, timeout=20, retries=0)
    def export() -> str:
        job = current_job()
        deadline = time.monotonic() + 15
        while not job.cancelled and time.monotonic() < deadline:
            time.sleep(0.01)
        return f"soft_limit_exceeded={job.soft_limit_exceeded} cancelled={job.cancelled}"

    with running_worker(app):
        assert export.send().result(timeout=20) == "soft_limit_exceeded=True cancelled=True"


def test_the_thread_pool_fails_the_job_at_the_hard_limit_and_asks_the_thread_to_stop(
    app: App,
) -> None:
    flags: list[tuple[bool, bool]] = []
    stopped = threading.Event()

    @app.task(soft_timeout=0.1, timeout=0.4, retries=0)
    def stubborn() -> None:
        job = current_job()
        while not job.cancelled:
            time.sleep(0.01)
        flags.append((job.soft_limit_exceeded, job.cancelled))  # at the soft limit
        stopped.wait(15)  # ignores it past the hard limit

    with running_worker(app):
        handle = stubborn.send()
        error = failure(app, handle.id)
        stopped.set()
    assert error.type == "taskmill.errors.TaskTimeoutError"
    assert error.message == (
        f"task {stubborn.name} timed out after 0.4 s (its hard time limit); its thread was "
        "asked to stop via current_job().cancelled"
    )
    assert flags == [(True, True)]


def test_no_soft_limit_no_flags(app: App) -> None:
    @app.task(timeout=20)
    def quick() -> tuple[bool, bool]:
        job = current_job()
        return job.soft_limit_exceeded, job.cancelled

    with running_worker(app):
        assert quick.send().result(timeout=20) == (
            False,
            False,
        )  # the return annotation decodes the result


def test_the_hard_limit_error_is_a_timeout_error_and_the_soft_one_is_not() -> None:
    # an ``except TimeoutError`` around a task's own I/O must not swallow the soft limit
    assert issubclass(TaskTimeoutError, TimeoutError)
    assert not issubclass(SoftTimeLimitExceeded, TimeoutError)
    assert issubclass(SoftTimeLimitExceeded, Exception)  # retried by default
