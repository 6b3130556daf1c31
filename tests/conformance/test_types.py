"""Arguments and results arrive as the types the function declares, not as their JSON form.

JSON has no datetime, bytes, set, Decimal or UUID; the worker decodes each stored argument to
its parameter's annotation, and ``result()`` the result to the return annotation. Unannotated
parameters keep JSON types. A stored value that does not convert fails the job at once; a sent
one is refused at ``send``.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID, uuid4

import msgspec
import pytest

from taskmill import App, JobFailedError, JobState, SerializationError, current_job
from taskmill.testing import running_worker

from .conftest import AppFactory
from .helpers import opened

WHEN = datetime(2024, 5, 1, 9, 30, 15, 123456, tzinfo=UTC)
NAIVE = datetime(2024, 5, 2, 8, 0)
BLOB = b"\x00\x01binary\xff"
ID = UUID("0b5c7a2e-6f1d-4a9e-8c3b-2d4e6f8a0b1c")


class Point(msgspec.Struct):
    x: int
    y: int


def _types(values: dict[str, Any]) -> dict[str, type]:
    return {name: type(value) for name, value in values.items()}


def test_annotated_arguments_and_result_arrive_as_their_types(app_factory: AppFactory) -> None:
    app = app_factory()
    received: dict[str, Any] = {}

    @app.task(name="calendar.typed")
    def typed(
        when: datetime,
        blob: bytes,
        s: set[int],
        d: Decimal,
        u: UUID,
        items: list[datetime],
        plain,  # type: ignore[no-untyped-def]  # unannotated on purpose: JSON values
    ) -> datetime:
        received.update(when=when, blob=blob, s=s, d=d, u=u, items=items, plain=plain)
        return when + timedelta(days=1)

    plain = {"at": WHEN, "tags": (1, 2), "ids": {3}}
    with running_worker(app):
        handle = typed.send(WHEN, BLOB, {1, 2}, Decimal("1.10"), ID, [WHEN, NAIVE], plain)
        result = handle.result(timeout=10)

    assert _types(received) == {
        "when": datetime,
        "blob": bytes,
        "s": set,
        "d": Decimal,
        "u": UUID,
        "items": list,
        "plain": dict,
    }
    assert received["when"] == WHEN and received["when"].tzinfo is not None
    assert received["blob"] == BLOB
    assert received["s"] == {1, 2}
    assert received["d"] == Decimal("1.10") and str(received["d"]) == "1.10"
    assert received["u"] == ID
    assert received["items"] == [WHEN, NAIVE]
    assert [type(i) for i in received["items"]] == [datetime, datetime]
    assert received["items"][1].tzinfo is None, "a naive datetime stays naive"
    # unannotated: JSON values, as stored
    assert received["plain"] == {"at": "2024-05-01T09:30:15.123456Z", "tags": [1, 2], "ids": [3]}

    assert type(result) is datetime and result == WHEN + timedelta(days=1)
    # a handle made from the id alone finds the task by name: the same type
    assert app.job(handle.id).result(timeout=10) == result
    # a producer that does not have the task gets the JSON value
    other = app_factory(share=app)
    assert other.job(handle.id).result(timeout=10) == "2024-05-02T09:30:15.123456Z"


def test_keyword_args_varargs_and_async_tasks_are_decoded(app: App) -> None:
    @app.task(name="geo.route")
    async def route(
        start: Point, *stops: Point, at: datetime | None = None, **tags: UUID
    ) -> list[Point]:
        assert at is None or type(at) is datetime
        assert all(type(t) is UUID for t in tags.values())
        return [start, *stops]

    other = uuid4()
    with running_worker(app):
        handle = route.send(Point(0, 0), Point(1, 2), Point(3, 4), at=WHEN, trip=ID, by=other)
        assert handle.result(timeout=10) == [Point(0, 0), Point(1, 2), Point(3, 4)]
        keywords = route.send(start=Point(5, 5))
        assert keywords.result(timeout=10) == [Point(5, 5)]


def test_a_stored_value_that_does_not_convert_fails_at_once(app_factory: AppFactory) -> None:
    old = app_factory()

    @old.task(name="calendar.remind")
    def remind_v1(when: str, note: str) -> None:
        return None

    handle = remind_v1.send("next tuesday", "dentist")

    new = app_factory(share=old)  # a later deploy: the same task now declares a datetime

    @new.task(name="calendar.remind", retries=3)
    def remind_v2(when: datetime, note: str) -> None:
        raise AssertionError("never called with a value that is not a datetime")

    @new.task()
    def after() -> str:
        return "still working"

    with running_worker(new, concurrency=1):
        with pytest.raises(JobFailedError) as info:
            handle.result(timeout=10)
        assert after.send().result(timeout=10) == "still working"
    assert info.value.type == "taskmill.errors.SerializationError"
    assert info.value.message == (
        "task 'calendar.remind': argument 'when' (a JSON string) does not convert to its "
        "annotation datetime: Invalid RFC3339 encoded datetime"
    )
    job = old.get_job(handle.id)
    assert job.state is JobState.FAILED and job.attempt == 1, "no retry can fix stored data"


def test_a_result_that_does_not_fit_its_annotation_fails_at_once(app: App) -> None:
    @app.task(name="calendar.next_slot", retries=3)
    def next_slot() -> datetime:
        return "tomorrow"  # type: ignore[return-value]

    with running_worker(app):
        handle = next_slot.send()
        with pytest.raises(JobFailedError) as info:
            handle.result(timeout=10)
    assert info.value.type == "taskmill.errors.SerializationError"
    assert info.value.message == (
        "task 'calendar.next_slot': its result (a JSON string) does not convert to its return "
        "annotation datetime: Invalid RFC3339 encoded datetime"
    )
    assert app.get_job(handle.id).attempt == 1


def test_send_refuses_a_value_that_would_not_convert_and_stores_nothing(app: App) -> None:
    @app.task(name="calendar.book")
    def book(when: datetime, seats: int, room: UUID | None = None) -> None:
        return None

    with pytest.raises(SerializationError) as info:
        book.send("soon", 2)  # type: ignore[arg-type]
    assert str(info.value) == (
        "task 'calendar.book': argument 'when' (a JSON string) does not convert to its "
        "annotation datetime: Invalid RFC3339 encoded datetime"
    )
    with pytest.raises(SerializationError, match=r"argument 'seats' \(a JSON boolean\)"):
        book.send(WHEN, True)
    with pytest.raises(SerializationError, match=r"argument 'room' \(a JSON number\)"):
        book.send(WHEN, 2, room=7)  # type: ignore[arg-type]
    with pytest.raises(SerializationError, match=r"argument 'seats'"):
        book.send_many([(WHEN, 2), (WHEN, "two")])
    with pytest.raises(SerializationError, match=r"argument 'when'"):
        app.send_task("calendar.book", ["2024-13-45T00:00:00"], {"seats": 1})
    assert [j.id for j in app.run_sync(opened(app).list_jobs())] == []
    # what does convert is stored: ISO text for a datetime, text for a UUID
    assert book.send("2024-05-01T09:30:00Z", 2, room=str(ID)).status() is JobState.QUEUED  # type: ignore[arg-type]


async def test_asend_refuses_a_value_that_would_not_convert(app: App) -> None:
    @app.task(name="calendar.abook")
    def abook(when: datetime) -> None:
        return None

    with pytest.raises(SerializationError, match=r"calendar\.abook.*'when'"):
        await abook.asend(12)  # type: ignore[arg-type]
    assert await (await app.abroker()).list_jobs() == []


def test_hooks_and_current_job_see_decoded_arguments_result_and_duration(app: App) -> None:
    seen: dict[str, Any] = {}
    inside: dict[str, Any] = {}
    done = threading.Event()

    def on_start(job: Any) -> None:
        seen["start"] = (job.args, dict(job.kwargs), job.duration_s, job.state)

    def on_success(job: Any, result: Any) -> None:
        seen["success"] = (job.args, dict(job.kwargs), job.duration_s, job.result, result)
        seen["payload"] = job.payload
        done.set()

    @app.task(name="billing.invoice", on_start=on_start, on_success=on_success)
    def invoice(when: datetime, amount: Decimal, *, customer: UUID) -> datetime:
        job = current_job()
        inside["args"], inside["kwargs"] = job.args, dict(job.kwargs)
        threading.Event().wait(0.05)  # the work being timed, not a synchronisation
        return when

    with running_worker(app):
        handle = invoice.send(WHEN, Decimal("9.99"), customer=ID)
        assert handle.result(timeout=10) == WHEN
        assert done.wait(10)

    args, kwargs = (WHEN, Decimal("9.99")), {"customer": ID}
    assert inside == {"args": args, "kwargs": kwargs}
    assert [type(a) for a in inside["args"]] == [datetime, Decimal]
    assert type(inside["kwargs"]["customer"]) is UUID
    assert seen["start"] == (args, kwargs, None, JobState.RUNNING)
    s_args, s_kwargs, duration, job_result, result = seen["success"]
    assert (s_args, s_kwargs) == (args, kwargs)
    assert type(result) is datetime and result == WHEN and job_result is result
    assert isinstance(duration, float) and 0.05 <= duration < 10
    assert seen["payload"] == app.get_job(handle.id).payload  # the raw JSON is still there


def test_failure_hooks_see_decoded_arguments_and_duration(app: App) -> None:
    seen: list[tuple[str, Any, Any]] = []

    @app.task(
        name="billing.charge",
        retries=1,
        backoff=0,
        on_retry=lambda job, error, delay: seen.append(("retry", job.args, job.duration_s)),
        on_failure=lambda job, error: seen.append(("failure", job.args, job.duration_s)),
    )
    def charge(customer: UUID) -> None:
        raise ConnectionError("card network down")

    with running_worker(app):
        handle = charge.send(ID)
        with pytest.raises(JobFailedError):
            handle.result(timeout=10)

    assert [(kind, args) for kind, args, _ in seen] == [("retry", (ID,)), ("failure", (ID,))]
    assert all(type(args[0]) is UUID for _, args, _ in seen)
    assert all(isinstance(duration, float) and duration >= 0 for _, _, duration in seen)


def test_a_job_whose_arguments_do_not_convert_reaches_on_failure_as_stored(
    app_factory: AppFactory,
) -> None:
    old = app_factory()
    old.task(name="billing.refund")(lambda customer: None)
    handle = old.send_task("billing.refund", [12])

    new = app_factory(share=old)
    failures: list[tuple[Any, Any, str]] = []
    started: list[str] = []

    @new.task(
        name="billing.refund",
        on_start=lambda job: started.append(job.id),
        on_failure=lambda job, error: failures.append((job.args, job.duration_s, error.type)),
    )
    def refund(customer: UUID) -> None:
        return None

    with running_worker(new), pytest.raises(JobFailedError):
        handle.result(timeout=10)
    # never started: on_start is not called; the failure hook gets the JSON values stored
    assert started == []
    assert failures == [((12,), None, "taskmill.errors.SerializationError")]
