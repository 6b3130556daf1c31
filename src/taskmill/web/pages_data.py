"""What the pages show, gathered from the admin API of ``App``: a job with its arguments named
and redacted, its timeline and workflow; the throughput of the last hour and its chart; the
schedules."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from taskmill._ids import workflow_of
from taskmill.errors import JobNotFoundError
from taskmill.job import Job, JobState
from taskmill.scheduler import ScheduleStatus, schedule_statuses
from taskmill.web.redact import job_view

if TYPE_CHECKING:
    from taskmill.app import App

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


# --- one job ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShownJob:
    """What the job page shows of a job's data, with the configured names redacted."""

    arguments: dict[str, Any]
    """By parameter name: positional ones named through the task's signature (``#0``,
    ``#1``... past it, or for a task this app does not have)."""
    result: Any
    meta: Any
    error: dict[str, str] | None
    """``type``, ``message``, ``traceback``."""
    progress_message: str | None


def shown_job(app: App, job: Job, names: Sequence[str]) -> ShownJob:
    """The job as the API shows it (``web/redact.py``'s ``job_view``: also hides a secret
    value that an error message or traceback repeats), its arguments named."""
    view = job_view(job, app.tasks.get(job.task), names)
    if view.get("args") is None:  # an unreadable payload
        arguments = {"payload": view.get("payload")}
    else:
        named = _positional_names(app, job.task, len(view["args"]))
        arguments = {**dict(zip(named, view["args"], strict=True)), **view["kwargs"]}
    return ShownJob(
        arguments, view["result"], view["meta"], view["error"], view["progress_message"]
    )


def named_arguments(app: App, job: Job) -> dict[str, Any]:
    """The job's arguments by parameter name, nothing hidden (``ShownJob.arguments``)."""
    return shown_job(app, job, ()).arguments


def _positional_names(app: App, task_name: str, n: int) -> list[str]:
    task = app.tasks.get(task_name)
    names: list[str] = []
    if task is not None:
        for p in task.signature.parameters.values():
            if p.kind in _POSITIONAL:
                names.append(p.name)
            elif p.kind is inspect.Parameter.VAR_POSITIONAL:
                names += [f"{p.name}[{i}]" for i in range(n - len(names))]
    names = names[:n]
    return names + [f"#{i}" for i in range(len(names), n)]


@dataclass(frozen=True)
class Moment:
    """A line of a job's timeline."""

    what: str
    at: float


def timeline(job: Job) -> list[Moment]:
    """The stored times of a job, in order."""
    moments = [Moment("enqueued", job.enqueued_at)]
    if job.run_at > job.enqueued_at + 0.5:
        moments.append(Moment("due", job.run_at))
    if job.started_at is not None:
        moments.append(Moment(f"attempt {job.attempt} started", job.started_at))
    if job.finished_at is not None:
        moments.append(Moment(job.state.value, job.finished_at))
    return sorted(moments, key=lambda m: m.at)


@dataclass(frozen=True)
class StepView:
    job_id: str
    state: JobState | None
    """None: not released yet (waiting for its parents)."""
    task: str | None = None
    """Known when the admin API gives a workflow's steps with their tasks."""


@dataclass(frozen=True)
class WorkflowView:
    id: str
    state: str
    steps: list[StepView]
    created_at: float | None = None


async def workflow(app: App, workflow_id: str) -> WorkflowView | None:
    """A workflow's state and steps; None if there is no such workflow (or it was pruned)."""
    try:
        return _workflow_view(await app.aget_workflow(workflow_id))
    except JobNotFoundError:
        return None


def _workflow_view(status: Any) -> WorkflowView:
    steps = [StepView(s.job_id, s.state, s.task) for s in status.steps]
    return WorkflowView(status.id, status.state, steps, status.created_at)


async def running_workflows(app: App, limit: int = 50) -> list[WorkflowView]:
    """The running workflows, oldest first."""
    return [_workflow_view(status) for status in await app.alist_workflows(limit)]


async def workflow_of_job(app: App, job: Job) -> WorkflowView | None:
    workflow_id = workflow_of(job.id)
    return None if workflow_id is None else await workflow(app, workflow_id)


# --- throughput ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Throughput:
    """Succeeded and failed jobs per minute, oldest minute first."""

    start: float
    """The first minute's start (seconds since the epoch)."""
    succeeded: list[int]
    failed: list[int]


async def throughput(app: App, now: float, minutes: int = 60) -> Throughput:
    """The admin API's counts per minute (``athroughput``)."""
    points = await app.athroughput(minutes)
    succeeded = [p.succeeded for p in points]
    return Throughput(
        points[0].at,
        succeeded,
        [p.failed for p in points],
    )


@dataclass(frozen=True)
class Bar:
    """One minute of the chart: a succeeded bar with a failed one stacked on it (SVG units)."""

    x: float
    width: float
    ok_y: float
    ok_height: float
    failed_y: float
    failed_height: float
    label: str


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    peak: int
    bars: list[Bar]


def chart(data: Throughput, width: int = 600, height: int = 120) -> Chart:
    """The bars of an SVG chart of ``data``, scaled to the busiest minute."""
    totals = [s + f for s, f in zip(data.succeeded, data.failed, strict=True)]
    peak = max(totals, default=0) or 1
    step = width / max(1, len(totals))
    bars = []
    for i, (ok, bad) in enumerate(zip(data.succeeded, data.failed, strict=True)):
        ok_h = height * ok / peak
        bad_h = height * bad / peak
        minutes_ago = len(totals) - 1 - i
        label = f"{minutes_ago} min ago: {ok} succeeded, {bad} failed"
        top = height - ok_h
        bars.append(Bar(i * step, max(1.0, step - 1), top, ok_h, top - bad_h, bad_h, label))
    return Chart(width, height, max(totals, default=0), bars)


# --- schedules ----------------------------------------------------------------------------------


async def schedules(app: App, n_next: int = 3) -> list[ScheduleStatus]:
    """Each periodic schedule with its next ticks and its last tick's outcome (what ``taskmill
    schedules`` shows), by name."""
    statuses = await schedule_statuses(app, n_next)
    return sorted(statuses, key=lambda s: s.schedule.name)


def task_names(app: App) -> Sequence[str]:
    return [t.name for t in app.registered_tasks()]
