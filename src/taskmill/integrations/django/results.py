"""A taskmill job as Django's ``TaskResult``: what ``get_result`` returns.

| taskmill job state | ``TaskResultStatus`` |
|---|---|
| scheduled (a delay, or waiting for its next retry), queued | ``READY`` |
| running | ``RUNNING`` |
| succeeded | ``SUCCESSFUL`` (``return_value``: the stored result) |
| failed | ``FAILED`` |
| cancelled | ``FAILED``, its error a ``taskmill.errors.JobCancelledError`` (Django has none) |

``errors`` holds the job's last error (taskmill keeps the last one, not one per attempt), so
a job waiting for a retry is ``READY`` with the error that made it retry. ``worker_ids`` has
one entry per attempt (Django's ``attempts`` is its length), each the id of the worker that
ran the latest attempt: taskmill does not keep the earlier ones. Times are aware datetimes in
UTC, or naive ones in the current time zone when ``USE_TZ`` is off, as Django's are.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from django import conf  # type: ignore[import-untyped]
from django.utils import timezone  # type: ignore[import-untyped]

from taskmill.integrations.django._compat import (
    TASK_MAX_PRIORITY,
    TASK_MIN_PRIORITY,
    InvalidTaskError,
    Task,
    TaskError,
    TaskResult,
    TaskResultStatus,
)
from taskmill.job import Job, JobState
from taskmill.serialization import decode, decode_payload

__all__ = ["STATUSES", "as_django_time", "class_path", "task_result"]

# Looked up by value: without django-stubs, mypy types a member of a TextChoices as a tuple.
STATUSES: dict[JobState, TaskResultStatus] = {
    JobState.SCHEDULED: TaskResultStatus("READY"),
    JobState.QUEUED: TaskResultStatus("READY"),
    JobState.RUNNING: TaskResultStatus("RUNNING"),
    JobState.SUCCEEDED: TaskResultStatus("SUCCESSFUL"),
    JobState.FAILED: TaskResultStatus("FAILED"),
    JobState.CANCELLED: TaskResultStatus("FAILED"),
}

_CANCELLED = "taskmill.errors.JobCancelledError"


def task_result(job: Job, task: Task[Any, Any], alias: str) -> TaskResult[Any]:
    """The ``TaskResult`` of ``job``, a run of the Django ``task`` sent through backend
    ``alias``."""
    args, kwargs = decode_payload(job.payload)
    result: TaskResult[Any] = TaskResult(
        task=_as_sent(task, job),
        id=job.id,
        status=STATUSES[job.state],
        enqueued_at=as_django_time(job.enqueued_at),
        started_at=as_django_time(job.started_at),
        finished_at=as_django_time(job.finished_at),
        last_attempted_at=as_django_time(job.started_at),
        args=args,
        kwargs=kwargs,
        backend=alias,
        errors=_errors(job),
        worker_ids=[job.worker_id or "unknown"] * job.attempt,
    )
    if job.state is JobState.SUCCEEDED and job.result is not None:
        object.__setattr__(result, "_return_value", decode(job.result))
    return result


def as_django_time(ts: float | None) -> datetime | None:
    """A Unix time as Django keeps times: aware in UTC, or naive local with ``USE_TZ`` off."""
    if ts is None:
        return None
    moment = datetime.fromtimestamp(ts, UTC)
    return moment if conf.settings.USE_TZ else timezone.make_naive(moment)


def class_path(error_type: str) -> str:
    """taskmill's name of an exception class as Django's ``exception_class_path``, which
    ``TaskError.exception_class`` imports: builtins get their module back.

    >>> class_path("ValueError"), class_path("shop.errors.OutOfStock")
    ('builtins.ValueError', 'shop.errors.OutOfStock')
    """
    return error_type if "." in error_type else f"builtins.{error_type}"


def _as_sent(task: Task[Any, Any], job: Job) -> Task[Any, Any]:
    """The task with the options the job was sent with: its queue, priority, and the time it
    may run from when it was delayed (or waits for a retry)."""
    priority = min(max(job.priority, TASK_MIN_PRIORITY), TASK_MAX_PRIORITY)
    run_after = as_django_time(job.run_at) if job.run_at > job.enqueued_at + 0.001 else None
    try:
        return task.using(priority=priority, queue_name=job.queue, run_after=run_after)
    except InvalidTaskError:  # a queue QUEUES no longer lists: the result is still readable
        return task.using(priority=priority, run_after=run_after)


def _errors(job: Job) -> list[TaskError]:
    if job.error is not None:
        error = job.error
        trace = error.traceback or f"{error.type}: {error.message}\n"
        return [TaskError(exception_class_path=class_path(error.type), traceback=trace)]
    if job.state is JobState.CANCELLED:
        return [TaskError(exception_class_path=_CANCELLED, traceback="the job was cancelled\n")]
    return []
