"""A request's status, read from taskmill: its workflow and its steps' jobs. Nothing here is
stored by the example; the seed's ``generation_tasks.status`` column is gone.

The pipeline: ``pending`` (no batch started) → ``generating`` (batches running or waiting) →
``collecting`` (every batch ended, the callback has not) → ``completed`` (every batch
succeeded), ``partial`` (some did) or ``failed`` (none did). A finished request whose failed
batches were retried is ``retrying`` until they end again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from examples.avatar_generator.tasks import generate_batch
from taskmill import App, JobState
from taskmill.workflows import WorkflowStep

WAITING = {JobState.SCHEDULED, JobState.QUEUED}


@dataclass
class Batch:
    number: int
    job_id: str
    state: str
    attempt: int
    personas: list[dict[str, str]] = field(default_factory=list)
    error: str | None = None


@dataclass
class Request:
    id: str
    created_at: float
    status: str
    batches: list[Batch]

    @property
    def personas(self) -> list[dict[str, str]]:
        return [p for b in self.batches for p in b.personas]

    @property
    def failed_batches(self) -> list[int]:
        return [b.number for b in self.batches if b.state == JobState.FAILED]

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "created_at": self.created_at,
            "personas": len(self.personas),
            "failed_batches": self.failed_batches,
            "batches": [
                {
                    "number": b.number,
                    "job_id": b.job_id,
                    "state": b.state,
                    "attempt": b.attempt,
                    "personas": len(b.personas),
                    "error": b.error,
                }
                for b in self.batches
            ],
        }


def pipeline_status(batches: list[JobState | None], callback: JobState | None) -> str:
    """The request's place in the pipeline from its steps' states (None: not enqueued yet).

    >>> S = JobState
    >>> pipeline_status([S.QUEUED, S.QUEUED], None)
    'pending'
    >>> pipeline_status([S.SUCCEEDED, S.RUNNING], None)
    'generating'
    >>> pipeline_status([S.SUCCEEDED, S.FAILED], S.QUEUED)
    'collecting'
    >>> pipeline_status([S.SUCCEEDED, S.FAILED], S.SUCCEEDED)
    'partial'
    >>> pipeline_status([S.SUCCEEDED, S.QUEUED], S.SUCCEEDED)
    'retrying'
    >>> pipeline_status([S.SUCCEEDED, S.SUCCEEDED], S.SUCCEEDED)
    'completed'
    """
    if any(s is None or not s.finished for s in batches):
        if callback is not None and callback.finished:
            return "retrying"
        started = any(s is not None and s not in WAITING for s in batches)
        return "generating" if started else "pending"
    if callback is None or not callback.finished:
        return "collecting"
    succeeded = sum(s is JobState.SUCCEEDED for s in batches)
    if succeeded == len(batches):
        return "completed"
    return "partial" if succeeded else "failed"


def describe(app: App, request_id: str) -> Request:
    """The request ``request_id`` (its workflow's id); ``JobNotFoundError`` if unknown."""
    workflow = app.get_workflow(request_id)
    *batch_steps, callback = workflow.steps
    batches = [_batch(app, n, step) for n, step in enumerate(batch_steps)]
    states = [step.state for step in batch_steps]
    status = pipeline_status(states, callback.state)
    if workflow.state in ("failed", "cancelled") and status == "collecting":
        status = "failed"  # the callback itself failed, or the request was cancelled
    return Request(workflow.id, workflow.created_at, status, batches)


def _batch(app: App, number: int, step: WorkflowStep) -> Batch:
    if step.state is None:
        return Batch(number, step.job_id, "waiting", 0)
    job = app.get_job(step.job_id)
    batch = Batch(number, job.id, job.state.value, job.attempt)
    if job.state is JobState.SUCCEEDED and job.result is not None:
        batch.personas = json.loads(job.result)
    if job.error is not None:
        batch.error = f"{job.error.type}: {job.error.message}"
    return batch


def recent_request_ids(app: App, limit: int = 50) -> list[str]:
    """The newest requests' ids, found through their batch jobs (ids ``wf:<request>:<step>``,
    docs/workflows.md)."""
    page = app.list_jobs(task=generate_batch.name, limit=limit * 10, count=False)
    ids: dict[str, None] = {}
    for job in page.jobs:
        if job.id.startswith("wf:"):
            ids.setdefault(job.id.split(":")[1], None)
    return list(ids)[:limit]
