"""Running one job, as a short pipeline of named steps:

resolve the task → read and bind the arguments → call it within its time limit → decide the
outcome. Recording started/finished is the worker's (claim and finish batches).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from taskmill.context import JobContext
from taskmill.errors import SerializationError, UnknownTaskError
from taskmill.job import Cancelled, Job, Outcome, Released, Succeeded
from taskmill.retry import decide
from taskmill.serialization import encode, payload_options
from taskmill.worker.pools import call_async

if TYPE_CHECKING:
    from taskmill.registry import Registry, TaskDefinition
    from taskmill.worker.pools import Runner


class Interrupt:
    """Why the worker interrupted a running job (set before cancelling its asyncio task)."""

    CANCEL = "cancel"  # someone cancelled the job
    SHUTDOWN = "shutdown"  # the worker is stopping: hand the job back
    LOST = "lost"  # the lease went to another worker


def cancelled_on_request(interrupted: list[str]) -> bool:
    return bool(interrupted) and interrupted[0] == Interrupt.CANCEL


def interrupted_outcome(interrupted: list[str]) -> Outcome:
    """The outcome of a job the worker cancelled: cancelled on request, else handed back."""
    if cancelled_on_request(interrupted):
        return Cancelled("cancelled on request")
    return Released()


def fail_now(job: Job, exc: BaseException) -> Outcome:
    """An error no retry can fix (unknown task, unreadable or unbindable arguments)."""
    return decide(
        attempt=job.attempt, max_attempts=job.max_attempts, policy=None, now=time.time(), exc=exc
    )


def resolve(registry: Registry, job: Job) -> TaskDefinition:
    task = registry.tasks.get(job.task)
    if task is None:
        known = ", ".join(sorted(registry.tasks)) or "none"
        raise UnknownTaskError(
            f"no task named {job.task!r} is registered in this worker's app (known: {known}); "
            "was it renamed, or is the worker running older code?"
        )
    return task


def arguments(
    task: TaskDefinition, job: Job, ctx: JobContext | None = None
) -> tuple[list[Any], dict[str, Any]]:
    """The stored arguments, decoded to the types the function declares and checked to bind
    to its signature (``taskmill.conversion``): a ``SerializationError`` or ``TypeError``
    otherwise. Decoded once per run: the first step that needs them (flow control, hooks or
    the call) keeps them on the job's context, where the others find them."""
    if ctx is not None and ctx._arguments is not None:
        return ctx._arguments
    decoded = task.types.arguments(job.payload)
    if ctx is not None:
        ctx._arguments = decoded
    return decoded


def check_result(task: TaskDefinition, result: bytes) -> None:
    """A result that would not decode to the task's return annotation is a
    ``SerializationError`` here, like one that cannot be encoded: not a surprise later in
    whoever reads it."""
    if task.types.result_decoder is not None:
        task.types.result(result)


def soft_limit_s(task: TaskDefinition, job: Job) -> float | None:
    """The job's soft time limit: the one its send stored, else this worker's registration of
    the task. None if it would not come before the hard limit (that one stops the run first)."""
    soft: float | None = payload_options(job.payload).get(
        "soft_timeout_s", task.defaults.soft_timeout_s
    )
    if soft is not None and job.timeout_s is not None and soft >= job.timeout_s:
        return None
    return soft


async def execute(
    registry: Registry, job: Job, ctx: JobContext, runner: Runner, interrupted: list[str]
) -> Outcome:
    """Run the job; ``interrupted`` holds the reason if the worker cancels this coroutine."""
    try:
        task = resolve(registry, job)
        args, kwargs = arguments(task, job, ctx)
    except (UnknownTaskError, SerializationError, TypeError) as exc:
        return fail_now(job, exc)
    try:
        soft_s = soft_limit_s(task, job)
        if task.is_async:  # on this loop, whatever the pool: pools are for sync functions
            value = await call_async(task, args, kwargs, ctx, job.timeout_s, soft_s)
        else:
            value = await runner.call(task, args, kwargs, ctx, job.timeout_s, soft_s)
        result = encode(value, what=f"result of task {task.name!r}")
        check_result(task, result)
    except asyncio.CancelledError:
        if interrupted:
            return interrupted_outcome(interrupted)
        raise
    except SerializationError as exc:
        return fail_now(job, exc)
    except BaseException as exc:
        if cancelled_on_request(interrupted):
            return interrupted_outcome(interrupted)
        return decide(
            attempt=job.attempt,
            max_attempts=job.max_attempts,
            policy=task.policy,
            now=time.time(),
            exc=exc,
        )
    if cancelled_on_request(interrupted):
        return Cancelled("cancelled on request (the task returned after the request)")
    return Succeeded(result)
