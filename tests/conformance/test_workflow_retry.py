"""Retrying a failed step of a failed workflow (``App.retry_jobs``, what the dashboard, the
HTTP API and ``taskmill jobs retry`` call) resumes the workflow, on every broker: once no
step blocks it any more it is ``running`` again, and the retried step, when it succeeds,
releases what it would have released the first time (docs/workflows.md, "Retrying a failed
step"). A cancelled workflow stays cancelled, a chord's callback that ran is not run again,
and a workflow whose finished steps were pruned is not resumed (it would run them twice)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from taskmill import App, JobCancelledError, JobState, WorkflowFailedError, chain, chord, group
from taskmill.brokers.features import workflow_store
from taskmill.workflows import WorkflowHandle, step_job_id

from .conftest import AppFactory
from .helpers import opened, wait_until


class Steps:
    """The tasks of these tests. ``flaky`` fails for each value in ``failing`` (no retries
    left: one attempt) and returns its input otherwise; every run of every task is counted."""

    def __init__(self, app: App) -> None:
        self.failing: set[int] = set()
        self.runs: list[tuple[str, Any]] = []
        lock = threading.Lock()

        def ran(name: str, value: Any) -> None:
            with lock:
                self.runs.append((name, value))

        @app.task(name="wfr.add")
        def add(x: int, y: int) -> int:
            ran("add", (x, y))
            return x + y

        @app.task(name="wfr.flaky", retries=0)
        def flaky(x: int) -> int:
            ran("flaky", x)
            if x in self.failing:
                raise ValueError(f"flaky on {x}")
            return x

        @app.task(name="wfr.collect")
        def collect(values: list[int]) -> list[int]:
            ran("collect", values)
            return values

        @app.task(name="wfr.report", accepts_failures=True)
        def report(values: list[Any]) -> list[Any]:
            ran("report", values)
            return values

        self.add, self.flaky, self.collect, self.report = add, flaky, collect, report

    def count(self, name: str) -> int:
        return sum(1 for n, _ in self.runs if n == name)


def failed(app: App, handle: WorkflowHandle) -> WorkflowFailedError:
    app.run_until_idle()
    assert handle.status() == "failed"
    with pytest.raises(WorkflowFailedError) as info:
        handle.result(timeout=10)
    return info.value


def step(handle: WorkflowHandle, name: str) -> str:
    return step_job_id(handle.id, name)


@pytest.mark.timeout(60)
def test_retrying_the_failed_step_of_a_chain_runs_the_rest(app: App) -> None:
    steps = Steps(app)
    steps.failing = {3}
    handle = chain(steps.add.s(1, 2), steps.flaky.s(), steps.add.s(100)).send()
    assert failed(app, handle).failed == {step(handle, "1"): ("ValueError", "flaky on 3")}
    assert handle.steps()[step(handle, "2")] is None

    steps.failing = set()
    assert app.retry_jobs([step(handle, "1")]) == [step(handle, "1")]
    assert handle.status() == "running"  # resumed at once, before the step runs again
    app.run_until_idle()
    assert handle.result(timeout=10) == 103  # the last step's result
    assert handle.status() == "succeeded"
    assert set(handle.steps().values()) == {JobState.SUCCEEDED}
    assert (steps.count("add"), steps.count("flaky")) == (2, 2)  # the first step ran once
    assert app.run_sync(workflow_store(opened(app)).running_workflows()) == []


@pytest.mark.timeout(60)
def test_retrying_a_failed_member_runs_the_chord_callback_once_with_every_result(
    app: App,
) -> None:
    steps = Steps(app)
    steps.failing = {5}
    handle = chord([steps.add.s(1, 1), steps.flaky.s(5), steps.add.s(2, 2)], steps.collect.s())
    handle = handle.send()
    failed(app, handle)
    assert steps.count("collect") == 0

    steps.failing = set()
    app.retry_jobs([step(handle, "1")])
    app.run_until_idle()
    assert handle.result(timeout=10) == [2, 5, 4]
    assert handle.status() == "succeeded"
    assert [v for n, v in steps.runs if n == "collect"] == [[2, 5, 4]]  # once
    app.run_until_idle()  # nothing left to release
    assert steps.count("collect") == 1


@pytest.mark.timeout(60)
def test_a_group_resumes_once_its_last_failed_member_is_retried(app: App) -> None:
    """Two members failed: retrying one re-runs it but the workflow stays failed (the other
    still blocks it), so what it releases waits; retrying the other resumes the workflow,
    which releases what waited at once, and its result holds every member's."""
    steps = Steps(app)
    steps.failing = {1, 2}
    flow = group([chain(steps.flaky.s(1), steps.add.s(10)), steps.flaky.s(2), steps.add.s(3, 0)])
    handle = flow.send()
    assert set(failed(app, handle).failed) == {step(handle, "0"), step(handle, "2")}

    steps.failing = set()
    app.retry_jobs([step(handle, "0")])
    app.run_until_idle()
    assert handle.steps()[step(handle, "0")] is JobState.SUCCEEDED
    assert handle.steps()[step(handle, "1")] is None  # held back: the workflow is failed
    assert set(failed(app, handle).failed) == {step(handle, "2")}

    app.retry_jobs([step(handle, "2")])
    assert handle.status() == "running"
    assert handle.steps()[step(handle, "1")] is JobState.QUEUED  # released on resuming
    app.run_until_idle()
    assert handle.result(timeout=10) == [11, 2, 3]
    assert handle.status() == "succeeded"
    assert (steps.count("flaky"), steps.count("add")) == (4, 2)


@pytest.mark.timeout(60)
def test_a_step_of_a_cancelled_workflow_retried_runs_alone(app: App) -> None:
    steps = Steps(app)
    handle = chain(steps.add.s(1, 2), steps.add.s(10), steps.add.s(100)).send()
    assert handle.cancel() == "cancelled"
    assert handle.steps()[step(handle, "0")] is JobState.CANCELLED

    assert app.retry_jobs([step(handle, "0")]) == [step(handle, "0")]
    app.run_until_idle()
    assert handle.steps() == {
        step(handle, "0"): JobState.SUCCEEDED,  # it ran, as a lone job
        step(handle, "1"): None,  # and released nothing
        step(handle, "2"): None,
    }
    assert steps.count("add") == 1
    assert handle.status() == "cancelled"
    with pytest.raises(JobCancelledError):
        handle.result(timeout=10)


@pytest.mark.timeout(60)
def test_a_chord_callback_that_ran_is_not_run_again_by_retrying_a_member(app: App) -> None:
    steps = Steps(app)
    steps.failing = {5}
    handle = chord([steps.add.s(1, 1), steps.flaky.s(5)], steps.report.s()).send()
    app.run_until_idle()
    failure = {"error": {"type": "ValueError", "message": "flaky on 5"}}
    assert handle.result(timeout=10) == [2, failure]

    steps.failing = set()
    assert app.retry_jobs([step(handle, "1")]) == [step(handle, "1")]
    app.run_until_idle()
    assert handle.steps()[step(handle, "1")] is JobState.SUCCEEDED  # the member ran again
    assert steps.count("report") == 1  # the callback did not
    assert handle.status() == "succeeded"
    assert handle.result(timeout=10) == [2, failure]  # what the callback returned


@pytest.mark.timeout(60)
def test_a_failed_workflow_whose_first_step_was_pruned_is_not_resumed(app: App) -> None:
    """Resuming would release the pruned first step again (its job is gone), running it
    twice: the retried step runs alone and the workflow stays failed."""
    steps = Steps(app)
    steps.failing = {3}
    handle = chain(steps.add.s(1, 2), steps.flaky.s(), steps.add.s(100)).send()
    failed(app, handle)
    broker = opened(app)
    assert app.run_sync(broker.delete([step(handle, "0")])) == [step(handle, "0")]

    steps.failing = set()
    assert app.retry_jobs([step(handle, "1")]) == [step(handle, "1")]
    app.run_until_idle()
    assert handle.steps() == {
        step(handle, "0"): None,
        step(handle, "1"): JobState.SUCCEEDED,
        step(handle, "2"): None,
    }
    assert steps.count("add") == 1
    assert handle.status() == "failed"


@pytest.mark.timeout(60)
def test_the_store_reopens_only_a_failed_workflow_and_no_longer_prunes_it(
    app_factory: AppFactory,
) -> None:
    """``WorkflowStore.reopen_workflow`` directly: failed becomes running (no finish time,
    listed among the running ones, kept by prune and by expiry), once; any other state, or
    an unknown id, is left as it is."""
    app = app_factory(result_ttl_s=1.0)  # Redis expires ended workflows after this
    broker = opened(app)
    store = workflow_store(broker)
    run = app.run_sync
    for workflow_id in ("running", "failed", "succeeded", "cancelled"):
        run(store.save_workflow(workflow_id, b"{}"))
        if workflow_id != "running":
            assert run(store.end_workflow(workflow_id, workflow_id))
    reopened = {w: run(store.reopen_workflow(w)) for w in ("running", "failed", "succeeded",
                                                           "cancelled", "unknown")}  # fmt: skip
    assert reopened == {
        "running": False, "failed": True, "succeeded": False, "cancelled": False,
        "unknown": False,
    }  # fmt: skip
    record = run(store.get_workflow("failed"))
    assert record is not None
    assert (record.state, record.finished_at) == ("running", None)
    assert run(store.running_workflows()) == ["running", "failed"]  # by creation, as before
    assert not run(store.reopen_workflow("failed"))  # once

    def pruned() -> bool:
        run(broker.prune(time.time() + 3600))
        return run(store.get_workflow("succeeded")) is None

    wait_until(pruned, what="the succeeded workflow pruned (or expired)")
    record = run(store.get_workflow("failed"))
    assert record is not None and record.state == "running"
