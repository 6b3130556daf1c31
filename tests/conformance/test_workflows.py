"""The ``WorkflowStore`` feature (``taskmill.brokers.features``), through workflows, and the
job store's ``get_many`` that advancing them reads steps with.

Workflows on every broker: chain, group, chord and their nesting; failure and cancel
semantics; a step whose worker died before advancing the workflow is released by the sweep."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from taskmill import (
    App,
    ConfigurationError,
    JobCancelledError,
    JobState,
    WorkflowFailedError,
    chain,
    chord,
    group,
)
from taskmill.brokers.features import workflow_store
from taskmill.job import Finish, Succeeded
from taskmill.testing import running_worker
from taskmill.workflows import step_job_id, sweep

from .helpers import claim_of, opened


def arithmetic(app: App) -> tuple[Any, Any, Any, Any]:
    @app.task(name="wf.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="wf.mul")
    def mul(x: int, y: int) -> int:
        return x * y

    @app.task(name="wf.total")
    def total(values: list[int]) -> int:
        return sum(values)

    @app.task(name="wf.boom", retries=0)
    def boom(x: int) -> int:
        raise ValueError(f"boom on {x}")

    return add, mul, total, boom


@pytest.mark.timeout(60)
def test_chain_group_chord_and_nesting(app: App) -> None:
    add, mul, total, _ = arithmetic(app)
    with running_worker(app):
        # each result is the next step's first argument
        assert chain(add.s(1, 2), mul.s(10), add.s(5)).send().result(timeout=20) == 35
        # a group's result is its members' results, in order
        assert group([add.s(1, 1), mul.s(3, 3), add.s(0, 7)]).send().result(timeout=20) == [
            2, 9, 7,
        ]  # fmt: skip
        assert chord([add.s(i, i) for i in range(5)], total.s()).send().result(timeout=20) == 20
        # a group inside a chain gets the previous result; a chain inside a group runs in order
        nested = chain(
            add.s(1, 2),
            group([mul.s(2), chain(add.s(1), mul.s(100)), group([add.s(0), add.s(1)])]),
        )
        assert nested.send().result(timeout=20) == [6, 400, [3, 4]]


@pytest.mark.timeout(60)
def test_a_failed_step_stops_the_chain_and_fails_the_workflow(app: App) -> None:
    add, _, _, boom = arithmetic(app)
    with running_worker(app):
        handle = chain(add.s(1, 2), boom.s(), add.s(100)).send()
        with pytest.raises(WorkflowFailedError) as info:
            handle.result(timeout=20)
    assert handle.status() == "failed"
    assert "boom on 3" in str(info.value)
    assert info.value.failed == {step_job_id(handle.id, "1"): ("ValueError", "boom on 3")}
    steps = handle.steps()
    assert steps[step_job_id(handle.id, "2")] is None  # never enqueued


@pytest.mark.timeout(60)
def test_a_chord_callback_runs_with_failures_only_if_it_accepts_them(app: App) -> None:
    add, _, total, boom = arithmetic(app)

    @app.task(name="wf.report", accepts_failures=True)
    def report(values: list[object]) -> list[object]:
        return values

    with running_worker(app):
        strict = chord([add.s(1, 1), boom.s(5)], total.s()).send()
        with pytest.raises(WorkflowFailedError, match="boom on 5"):
            strict.result(timeout=20)
        assert strict.steps()[step_job_id(strict.id, "2")] is None  # the callback never ran
        lenient = chord([add.s(1, 1), boom.s(5)], report.s()).send()
        assert lenient.result(timeout=20) == [
            2,
            {"error": {"type": "ValueError", "message": "boom on 5"}},
        ]


@pytest.mark.timeout(60)
def test_cancel_cancels_every_pending_step_and_releases_no_more(app: App) -> None:
    add, _, _, _ = arithmetic(app)
    started = threading.Event()
    release = threading.Event()

    @app.task(name="wf.gate")
    def gate(x: int) -> int:
        started.set()
        assert release.wait(20)
        return x

    with running_worker(app):
        handle = chain(group([gate.s(1), add.s(5, 5)]), add.s(0)).send()
        assert started.wait(20)
        assert handle.cancel() == "cancelled"
        release.set()
        with pytest.raises(JobCancelledError):
            handle.result(timeout=20)
    steps = handle.steps()
    assert steps[step_job_id(handle.id, "2")] is None  # the step after the group never ran
    assert steps[step_job_id(handle.id, "0")] in (JobState.CANCELLED, JobState.SUCCEEDED)


@pytest.mark.timeout(60)
def test_a_step_finished_without_advancing_is_released_by_the_sweep(app: App) -> None:
    """A worker that stored a step's outcome and died before advancing the workflow: the next
    step is released by any worker's maintenance sweep, once."""
    add, _, _, _ = arithmetic(app)
    handle = chain(add.s(1, 2), add.s(10)).send()
    broker = opened(app)
    (job,) = app.run_sync(broker.claim(["default"], 1, "dead", 30.0))
    assert job.id == step_job_id(handle.id, "0")
    app.run_sync(broker.finish([Finish(claim_of(job), Succeeded(b"3"))]))
    assert handle.steps()[step_job_id(handle.id, "1")] is None
    assert app.run_sync(sweep(app.client)) == 1
    assert app.run_sync(sweep(app.client)) == 1  # twice: still one job for the step
    assert handle.steps()[step_job_id(handle.id, "1")] is JobState.QUEUED
    assert len(app.run_sync(broker.list_jobs())) == 2
    with running_worker(app):
        assert handle.result(timeout=20) == 13
    assert app.run_sync(workflow_store(broker).running_workflows()) == []


def test_bad_workflows_are_refused_before_anything_is_stored(app: App) -> None:
    add, _, _, _ = arithmetic(app)
    with pytest.raises(TypeError, match=r"wf\.add"):
        chain(add.s(1, 2), add.s(1, 2)).send()  # the second step gets 3 arguments
    with pytest.raises(ConfigurationError, match="needs at least one"):
        group([])
    with pytest.raises(ConfigurationError, match="not 42"):
        chain(add.s(1, 2), 42)  # type: ignore[arg-type]
    assert app.run_sync(opened(app).list_jobs()) == []
    assert app.run_sync(workflow_store(opened(app)).running_workflows()) == []
