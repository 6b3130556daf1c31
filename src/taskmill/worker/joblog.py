"""One log line per step of a job's life, with structured fields (see ``taskmill.logs``).

Levels: a start is DEBUG, a success INFO (with its duration), a retry WARNING (the error and
the delay), a final failure ERROR (the error, and the stored traceback in the record's
``traceback`` field, which taskmill's formatters print), a cancel or a hand-back INFO. All go
to the ``taskmill.job`` logger.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from taskmill.job import Cancelled, Failed, Job, Outcome, Released, RetryAt, Succeeded

job_log = logging.getLogger("taskmill.job")


def fields(job: Job, worker_id: str, **more: Any) -> dict[str, Any]:
    return {
        "job_id": job.id,
        "task": job.task,
        "queue": job.queue,
        "attempt": job.attempt,
        "max_attempts": job.max_attempts,
        "worker_id": worker_id,
        **more,
    }


def log_start(job: Job, worker_id: str) -> None:
    job_log.debug(
        "job %s (%s) started: attempt %d of %d",
        job.id,
        job.task,
        job.attempt,
        job.max_attempts,
        extra=fields(job, worker_id),
    )


def log_outcome(job: Job, outcome: Outcome, duration_s: float, worker_id: str) -> None:
    """Log what a run ended in; the caller checked that INFO is enabled for ``job_log``."""
    if isinstance(outcome, Succeeded):
        job_log.info(
            "job %s (%s) succeeded in %.3f s",
            job.id,
            job.task,
            duration_s,
            extra=fields(job, worker_id, duration_s=round(duration_s, 6)),
        )
    elif isinstance(outcome, RetryAt):
        error = f"{outcome.error.type}: {outcome.error.message}"
        delay_s = max(0.0, outcome.run_at - time.time())
        job_log.warning(
            "job %s (%s) attempt %d of %d failed after %.3f s, retrying in %.1f s: %s",
            job.id,
            job.task,
            job.attempt,
            job.max_attempts,
            duration_s,
            delay_s,
            error,
            extra=fields(
                job, worker_id, duration_s=round(duration_s, 6), delay_s=round(delay_s, 3),
                error=error,
            ),
        )  # fmt: skip
    elif isinstance(outcome, Failed):
        error = f"{outcome.error.type}: {outcome.error.message}"
        job_log.error(
            "job %s (%s) failed on attempt %d of %d after %.3f s: %s",
            job.id,
            job.task,
            job.attempt,
            job.max_attempts,
            duration_s,
            error,
            extra=fields(
                job, worker_id, duration_s=round(duration_s, 6), error=error,
                traceback=outcome.error.traceback,
            ),
        )  # fmt: skip
    elif isinstance(outcome, Cancelled):
        job_log.info(
            "job %s (%s) cancelled: %s",
            job.id,
            job.task,
            outcome.reason or "on request",
            extra=fields(job, worker_id, duration_s=round(duration_s, 6)),
        )
    elif isinstance(outcome, Released):
        job_log.info(
            "job %s (%s) handed back (the worker is stopping, or no slot came free for it in"
            " reserve); it runs again, no attempt spent",
            job.id,
            job.task,
            extra=fields(job, worker_id),
        )
