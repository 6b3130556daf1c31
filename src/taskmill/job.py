"""What a job is: its record, its states, and the closed set of outcomes a run can have."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

import msgspec


class JobState(enum.StrEnum):
    SCHEDULED = "scheduled"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in FINISHED_STATES

    @classmethod
    def parse(cls, value: JobState | str) -> JobState:
        """A state from itself or its name; ``ValueError`` naming the valid states otherwise.

        >>> JobState.parse("failed") is JobState.FAILED
        True
        """
        try:
            return cls(value)
        except ValueError:
            valid = ", ".join(s.value for s in cls)
            raise ValueError(f"unknown job state {value!r} (valid: {valid})") from None


MetaValue = str | int | float | bool | None
Meta = dict[str, MetaValue]
"""A job's metadata: a small JSON object of str keys and scalar values (``taskmill.meta``)."""

FINISHED_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


class ErrorInfo(msgspec.Struct, frozen=True):
    """The last error of a job: exception type, message and formatted traceback."""

    type: str
    message: str
    traceback: str = ""


class NewJob(msgspec.Struct):
    """A job about to be stored; built by the task layer, written by ``Broker.enqueue``.

    ``payload`` is the JSON of ``[args, kwargs]``, already encoded and size-checked. The job is
    due at ``run_at`` if given, else ``delay_s`` after the broker's clock at enqueue (so brokers
    with a server clock measure delays on that clock).
    """

    id: str
    task: str
    queue: str
    payload: bytes
    priority: int = 0
    run_at: float | None = None
    delay_s: float = 0.0
    max_attempts: int = 1
    timeout_s: float | None = None
    key: str | None = None
    meta: Meta = msgspec.field(default_factory=dict)


class Job(msgspec.Struct):
    """A stored job as the broker returns it. A snapshot: it never saves itself."""

    id: str
    task: str
    queue: str
    state: JobState
    payload: bytes
    priority: int = 0
    attempt: int = 0
    max_attempts: int = 1
    run_at: float = 0.0
    enqueued_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    timeout_s: float | None = None
    key: str | None = None
    lease_token: str | None = None
    lease_expires_at: float | None = None
    worker_id: str | None = None
    lost_leases: int = 0
    cancel_requested: bool = False
    result: bytes | None = None
    error: ErrorInfo | None = None
    progress: float | None = None
    progress_message: str | None = None
    meta: Meta = msgspec.field(default_factory=dict)
    """Set at send (``options(meta=...)``), never changed: who or what the job is for."""

    def __repr__(self) -> str:
        """Every field but the arguments and the result, which may hold secrets (a log line
        or a traceback that shows a job must not show them): their size instead."""
        fields = []
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if name in ("payload", "result") and value is not None:
                fields.append(f"{name}=<{len(value)} bytes>")
            else:
                fields.append(f"{name}={value!r}")
        return f"Job({', '.join(fields)})"


class Claim(msgspec.Struct, frozen=True):
    """Proof that a worker holds a job: the id and the lease token the claim set.

    Every write a worker makes about a running job names its claim; a write whose token is no
    longer the job's current token is stale and is rejected (fencing).
    """

    job_id: str
    token: str


# --- outcomes: the closed set a run can end in, decided in ``retry.decide`` -----------------


class Succeeded(msgspec.Struct, frozen=True):
    result: bytes


class RetryAt(msgspec.Struct, frozen=True):
    run_at: float
    error: ErrorInfo
    delay_s: float = 0.0
    """The delay chosen (``Retry(delay=)``'s, or the task's back-off), which ``run_at`` adds
    to the time of the decision; what ``on_retry`` hooks are given."""


class Failed(msgspec.Struct, frozen=True):
    error: ErrorInfo


class Cancelled(msgspec.Struct, frozen=True):
    reason: str = ""


class Released(msgspec.Struct, frozen=True):
    """Handed back unstarted (worker shutdown): queued again, no attempt spent."""


Outcome = Succeeded | RetryAt | Failed | Cancelled | Released


class Finish(msgspec.Struct, frozen=True):
    claim: Claim
    outcome: Outcome


class Progress(msgspec.Struct, frozen=True):
    claim: Claim
    fraction: float | None
    message: str | None


class QueueStats(msgspec.Struct):
    """A queue's jobs by state (``counts``: every state's name), the age of its oldest
    waiting job, and whether it is paused. ``estimated``: the states whose count is an
    estimate (PostgreSQL's finished states on a large table; see docs/admin.md), empty when
    every count is exact."""

    queue: str
    counts: dict[str, int]
    oldest_waiting_s: float | None = None
    paused: bool = False
    estimated: list[str] = msgspec.field(default_factory=list)


class WorkerInfo(msgspec.Struct):
    id: str
    host: str
    pid: int
    queues: list[str]
    concurrency: int
    started_at: float
    heartbeat_at: float
    running: list[str] = msgspec.field(default_factory=list)
    processed: int = 0
    """Jobs this worker ran to an outcome (succeeded, failed, retried or cancelled) so far."""
    failed: int = 0
    """Of those, the runs that raised (failed for good, or to be retried)."""


def describe(job: Job) -> dict[str, Any]:
    """A plain dict of the job for display and JSON (payload and result decoded where
    possible, times as ISO 8601 in UTC)."""
    from taskmill.serialization import try_decode

    return {
        "id": job.id,
        "task": job.task,
        "queue": job.queue,
        "state": job.state.value,
        "priority": job.priority,
        "attempt": job.attempt,
        "max_attempts": job.max_attempts,
        "payload": try_decode(job.payload),
        "result": None if job.result is None else try_decode(job.result),
        "error": None if job.error is None else msgspec.structs.asdict(job.error),
        "progress": job.progress,
        "progress_message": job.progress_message,
        "run_at": _iso(job.run_at),
        "enqueued_at": _iso(job.enqueued_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "key": job.key,
        "worker_id": job.worker_id,
        "lost_leases": job.lost_leases,
        "meta": job.meta,
    }


def _iso(ts: float | None) -> str | None:
    """``2026-01-02T03:04:05.678901+00:00``: what JSON readers and ``datetime`` parse."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat()
