"""The limits at the edges (docs/payloads.md, "Limits"), on every broker: a send that breaks one
is refused with a clear error and stores nothing (no job, no workflow); a task whose result
breaks one fails at once, without a retry, instead of storing something else; a payload
stored nested past the limit (by another producer, or corrupted) fails its job with a clear
error, and the worker carries on."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from taskmill import (
    App,
    ConfigurationError,
    JobFailedError,
    JobState,
    SerializationError,
    chain,
)
from taskmill._ids import uuid7
from taskmill.job import NewJob
from taskmill.testing import running_worker

from .helpers import opened


def _nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


PARIS_1900 = datetime(1900, 1, 1, tzinfo=timezone(timedelta(minutes=9, seconds=21)))

REFUSED: dict[str, tuple[Any, str]] = {
    # what: (an argument, a part of the error's message)
    "NaN": (float("nan"), "args[0] is nan: JSON has no NaN or infinity"),
    "-inf in a dict": ({"price": [1.0, float("-inf")]}, "args[0]['price'][1] is -inf"),
    "keys 1 and '1'": ({1: "int", "1": "str"}, 'both "1" as JSON text'),
    "an offset with seconds": (PARIS_1900, "UTC offset, +00:09:21, is not whole minutes"),
    "an int of 4,300 digits": (-(10**4299), "integer of 4,300 digits"),
    "101 levels": (_nested(101), "args[0] nests lists and objects more than 100 deep"),
}


def _stored(app: App) -> list[str]:
    return [j.id for j in app.run_sync(opened(app).list_jobs())]


def test_what_json_would_change_is_refused_at_send_and_nothing_is_stored(app: App) -> None:
    @app.task(name="limits.sink")
    def sink(value: Any = None, *, also: Any = None) -> None:
        return None

    @app.task(name="limits.step")
    def step(previous: Any, value: Any = None) -> None:
        return None

    for what, (bad, says) in REFUSED.items():
        with pytest.raises(SerializationError, match=r"^arguments of task 'limits\.sink'") as info:
            sink.send(bad)
        assert says in str(info.value), what
        with pytest.raises(SerializationError, match=r"limits\.sink"):
            sink.send(also=[bad])
        with pytest.raises(SerializationError, match=r"limits\.sink"):
            sink.send_many([("fine",), (bad,)])  # the good one is not stored either
        with pytest.raises(SerializationError, match=r"limits\.sink"):
            app.send_task("limits.sink", [bad])
        with pytest.raises(SerializationError, match=r"limits\.step"):  # a later step's argument
            chain(sink.s("fine"), step.s(bad)).send()
    assert _stored(app) == []
    assert app.list_workflows() == []


def test_names_outside_the_syntax_are_refused_at_send_and_nothing_is_stored(app: App) -> None:
    @app.task(name="limits.named")
    def named() -> None:
        return None

    for queue in ("", "two words", "a,b", "a/b", "tab\t", "x" * 201):
        with pytest.raises(ConfigurationError, match="queue name"):
            named.options(queue=queue).send()
    for task in ("send email", "a/b", "<lambda>", "-x"):
        with pytest.raises(ConfigurationError, match="task name"):
            app.send_task(task, [], external=True)
    assert _stored(app) == []
    # the edges of what is allowed are stored
    long_name = "q" * 200
    handle = named.options(queue="billing:invoices.eu-1").send()
    assert app.get_job(handle.id).queue == "billing:invoices.eu-1"
    assert app.get_job(named.options(queue=long_name).send().id).queue == long_name
    assert app.send_task("Reports.Nightly_V2", [], external=True).status() is JobState.QUEUED


RESULTS: dict[str, tuple[Any, str]] = {
    "NaN": (float("nan"), "result is nan"),
    "inf in a list": ([1.5, float("inf")], "result[1] is inf"),
    "keys 1 and '1'": ({1: "int", "1": "str"}, 'both "1" as JSON text'),
    "an offset with seconds": (PARIS_1900, "is not whole minutes"),
    "101 levels": (_nested(101), "result nests lists and objects more than 100 deep"),
}


def test_a_result_json_would_change_fails_the_job_at_once(app: App) -> None:
    """Before: NaN and ±inf were stored as null, colliding keys merged, the offset's seconds
    were dropped: silently. Now the job fails, without a retry (none can change the result)."""

    @app.task(name="limits.returns", retries=3)
    def returns(what: str) -> Any:
        return RESULTS[what][0]

    @app.task(name="limits.fine")
    async def fine() -> list[float]:
        return [1.5, -0.0]

    with running_worker(app, concurrency=1):
        handles = {what: returns.send(what) for what in RESULTS}
        for what, handle in handles.items():
            with pytest.raises(JobFailedError) as info:
                handle.result(timeout=10)
            assert info.value.type == "taskmill.errors.SerializationError", what
            assert "result of task 'limits.returns' cannot be stored as JSON" in info.value.message
            assert RESULTS[what][1] in info.value.message, what
            job = app.get_job(handle.id)
            assert (job.state, job.attempt, job.result) == (JobState.FAILED, 1, None), what
        assert fine.send().result(timeout=10) == [1.5, -0.0]


def _stored_payload(app: App, task: str, payload: bytes) -> str:
    """A job stored with ``payload`` as it is: what another producer (or a corruption) wrote."""
    job = NewJob(id=uuid7(), task=task, queue="default", payload=payload)
    result = app.run_sync(opened(app).enqueue([job]))
    return result.ids[0]


@pytest.mark.timeout(120)
def test_a_payload_stored_nested_past_the_limit_fails_its_job(app: App) -> None:
    """The limit holds when the worker decodes, too: a payload deeper than what a send accepts
    (101 levels; 100,000, past the interpreter's recursion limit) fails its job at once with a
    clear error, for a task with annotations to convert and one without; 100 levels run."""

    @app.task(name="limits.plain", retries=3)
    def plain(value: Any) -> int:
        return 1

    @app.task(name="limits.typed", retries=3)
    def typed(value: list[Any]) -> int:
        return 2

    def payload(depth: int) -> bytes:
        return b"[[" + b"[" * depth + b"]" * depth + b"],{}]"

    ok = [_stored_payload(app, name, payload(100)) for name in ("limits.plain", "limits.typed")]
    bad = [
        _stored_payload(app, name, payload(depth))
        for depth in (101, 100_000)
        for name in ("limits.plain", "limits.typed")
    ]
    with running_worker(app, concurrency=1):
        assert [app.job(i).result(timeout=30) for i in ok] == [1, 2]
        for job_id in bad:
            with pytest.raises(JobFailedError) as info:
                app.job(job_id).result(timeout=30)
            assert info.value.type == "taskmill.errors.SerializationError"
            assert "nests lists and objects more than 100 deep" in info.value.message
            assert app.get_job(job_id).attempt == 1, "no retry can change a stored payload"
        assert plain.send([1]).result(timeout=10) == 1, "the worker carries on"


def test_a_time_offset_of_whole_minutes_and_utc_round_trip(app: App) -> None:
    """What to send instead of an offset with seconds: the same instant in UTC."""

    @app.task(name="limits.when")
    def when(at: datetime) -> datetime:
        return at

    with running_worker(app, concurrency=1):
        sent = PARIS_1900.astimezone(UTC)
        assert when.send(sent).result(timeout=10) == sent
