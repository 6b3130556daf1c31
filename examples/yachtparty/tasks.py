"""The taskmill side of the processor: one task per task type, the seed's retry schedule, and
the action log written by hooks.

Why one task per type rather than one ``process(task_type, context)`` task with the seed's
dispatch table inside: each type then has a name of its own everywhere taskmill shows jobs
(``stats``, listings, the dashboard, ``taskmill jobs list --task agent.research_solution``),
its arguments are checked against the handler's signature when the task is *sent* (a bad one is
a 422 to the caller, not a failure in a worker later), and a type could get its own retries or
timeout. The seed's ``taskHandlers`` record becomes the app's registry: ``agent.<task_type>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from examples.yachtparty.config import Config
from examples.yachtparty.db import Database
from examples.yachtparty.handlers import AgentHandlers, PermanentTaskError
from taskmill import App, Backoff, JobHandle, JobView
from taskmill.job import ErrorInfo

QUEUE = "agent_tasks"
TASK_TYPES = (
    "research_solution",
    "schedule_followup",
    "update_user_profile",
    "re_engagement_check",
)
# the seed's priorities, urgent to low, as taskmill's named priorities ("medium" is "normal")
PRIORITIES = {"urgent": "urgent", "high": "high", "medium": "normal", "low": "low"}
PREFIX = "agent."


def retry_policy(minute_s: float) -> dict[str, Any]:
    """The seed's schedule: a first attempt, then retries 1, 2 and 4 minutes after each
    failure (``minute_s`` long minutes), no jitter; a ``PermanentTaskError`` is not retried."""
    return {
        "retries": 3,
        "backoff": Backoff(base=minute_s, factor=2, cap=4 * minute_s, jitter=False),
        "dont_retry_on": PermanentTaskError,
    }


def task_type_of(task_name: str) -> str:
    return task_name.removeprefix(PREFIX)


class ActionLog:
    """The hooks that write ``agent_actions_log``: a row per attempt, with its latency (the
    handler's run time) and its wait (how long after it was due it started)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def succeeded(self, job: JobView, result: Any) -> None:
        self._write(job, "succeeded", output=result)

    def retrying(self, job: JobView, error: ErrorInfo, delay: float) -> None:
        self._write(job, "retrying", error=f"{error.type}: {error.message} (next in {delay:.1f} s)")

    def failed(self, job: JobView, error: ErrorInfo) -> None:
        self._write(job, "failed", error=f"{error.type}: {error.message}")

    def _write(
        self, job: JobView, outcome: str, *, output: Any = None, error: str | None = None
    ) -> None:
        started = job.started_at
        self.db.log_action({
            "action_type": "process_" + task_type_of(job.task),
            "outcome": outcome,
            "user_id": job.meta.get("user_id"),
            "context_id": job.id,
            "attempt": job.attempt,
            "scheduled_for": job.run_at,
            "started_at": started,
            "latency_ms": None if job.duration_s is None else job.duration_s * 1000,
            "wait_ms": None if started is None else max(0.0, started - job.run_at) * 1000,
            "input_data": {"args": list(job.args), "kwargs": dict(job.kwargs)},
            "output_data": output,
            "error": error,
        })  # fmt: skip


@dataclass
class Processor:
    """The taskmill app with its tasks, and the database the handlers and hooks write to."""

    app: App
    config: Config
    db: Database

    def send(self, task_type: str, kwargs: dict[str, Any], **options: Any) -> JobHandle[Any]:
        """Send a task of ``task_type`` with ``kwargs``; ``options`` as ``Task.options``
        takes them (``connection=`` puts the job in the caller's transaction). The job's
        metadata names its type and user, which the action log and listings filter on."""
        if task_type not in TASK_TYPES:
            raise UnknownTaskTypeError(task_type)
        meta = {"task_type": task_type, "user_id": kwargs.get("user_id"), **options.pop("meta", {})}
        task = self.app.get_task(PREFIX + task_type)
        return task.options(meta=meta, **options).send(**kwargs)

    def close(self) -> None:
        self.app.close()
        self.db.close()


class UnknownTaskTypeError(LookupError):
    def __init__(self, task_type: str) -> None:
        super().__init__(f"unknown task_type {task_type!r} (known: {', '.join(TASK_TYPES)})")


def build(config: Config) -> Processor:
    """The app on ``config.database_url``, its tasks and hooks registered. No I/O."""
    app = App(config.database_url, lease_s=config.lease_s)
    db = Database(config.database_url)
    processor = Processor(app, config, db)
    handlers = AgentHandlers(config, db, processor)
    for task_type in TASK_TYPES:
        register = app.task(name=PREFIX + task_type, queue=QUEUE, **retry_policy(config.minute_s))
        register(getattr(handlers, task_type))
    log = ActionLog(db)
    app.on_success(log.succeeded)
    app.on_retry(log.retrying)
    app.on_failure(log.failed)
    return processor
