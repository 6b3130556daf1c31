"""What every broker reads and writes the same way: a stored row as a ``Job``, an outcome as
the flat fields a statement or a script applies, and the error a recovered job is given.

The SQL brokers select the columns of ``JOB_COLUMNS`` in that order and hand the row to
``job_from_row``; every broker turns the outcomes it writes into ``FlatOutcome`` records with
``flatten_outcomes``, so the closed set of outcomes is mapped to storage in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import msgspec

from taskmill.errors import WorkerLostError
from taskmill.job import (
    Cancelled,
    ErrorInfo,
    Failed,
    Finish,
    Job,
    JobState,
    Released,
    RetryAt,
    Succeeded,
)
from taskmill.meta import decode_meta

JOB_COLUMNS = (
    "id", "task", "queue", "state", "payload", "priority", "attempt", "max_attempts", "run_at",
    "enqueued_at", "started_at", "finished_at", "timeout_s", "key", "lease_token",
    "lease_expires_at", "worker_id", "lost_leases", "cancel_requested", "result", "error",
    "progress", "progress_message", "meta",
)  # fmt: skip
"""The order of the columns ``job_from_row`` reads (times as Unix seconds)."""

RECOVERED_ERROR_TYPE = f"{WorkerLostError.__module__}.{WorkerLostError.__qualname__}"
RECOVERED_MESSAGE = (
    "lease expired on attempt {attempt} (worker {worker} stopped heartbeating); "
    "lost leases: {lost_leases}"
)
"""The message a job recovered from an expired lease is given. Brokers that recover in SQL or
Lua receive this text as a parameter and fill in the three fields there, in this order and as
plain text: ``{attempt}``, ``{lost_leases}``, then ``{worker}`` (``?`` if the job names none),
so a worker's name is never read as a placeholder."""

_error_decoder = msgspec.json.Decoder(ErrorInfo)
_error_encoder = msgspec.json.Encoder()


def recovered_error(attempt: int, worker: str | None, lost_leases: int) -> ErrorInfo:
    """The error of a job whose lease expired, for brokers that recover in Python.

    >>> recovered_error(2, "w1", 1).message
    'lease expired on attempt 2 (worker w1 stopped heartbeating); lost leases: 1'
    """
    message = (
        RECOVERED_MESSAGE.replace("{attempt}", str(attempt))
        .replace("{lost_leases}", str(lost_leases))
        .replace("{worker}", worker or "?")
    )
    return ErrorInfo(RECOVERED_ERROR_TYPE, message)


def encode_error(error: ErrorInfo) -> bytes:
    """A job's error as stored: JSON of ``type``, ``message`` and ``traceback``."""
    return _error_encoder.encode(error)


def decode_error(raw: bytes | str | None) -> ErrorInfo | None:
    """A stored error; text that is not the JSON ``encode_error`` wrote (written by another
    tool, or cut short) is kept as the message of an error of type ``unknown``.

    >>> decode_error(b"disk full")
    ErrorInfo(type='unknown', message='disk full', traceback='')
    """
    if raw is None or raw == b"" or raw == "":
        return None
    try:
        return _error_decoder.decode(raw)
    except msgspec.DecodeError:
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        return ErrorInfo("unknown", text)


def unreadable_record(where: str, exc: BaseException) -> ErrorInfo:
    """The error of a stored record that cannot be read as a job (written by another tool,
    or damaged): brokers fail it without running it, and carry on with the others.

    >>> unreadable_record("seq 7", KeyError("task")).message[:64]
    "stored record (seq 7) cannot be read as a job (KeyError: 'task')"
    """
    return ErrorInfo(
        "taskmill.errors.SerializationError",
        f"stored record ({where}) cannot be read as a job ({type(exc).__name__}: {exc}); "
        "failed without running",
    )


def job_from_row(r: Sequence[Any]) -> Job:
    """A job from the values of ``JOB_COLUMNS``, in that order."""
    return Job(
        id=r[0],
        task=r[1],
        queue=r[2],
        state=JobState(r[3]),
        payload=r[4] if isinstance(r[4], bytes) else _blob(r[4]),
        priority=r[5],
        attempt=r[6],
        max_attempts=r[7],
        run_at=r[8],
        enqueued_at=r[9],
        started_at=r[10],
        finished_at=r[11],
        timeout_s=r[12],
        key=r[13],
        lease_token=r[14],
        lease_expires_at=r[15],
        worker_id=r[16],
        lost_leases=r[17],
        cancel_requested=bool(r[18]),
        result=r[19],
        error=decode_error(r[20]),
        progress=r[21],
        progress_message=r[22],
        meta=decode_meta(r[23]),
    )


def _blob(value: object) -> bytes:
    """A payload read as another type than bytes: a ``memoryview``, or text (SQLite stores
    what it is given: a row written by another tool may hold its JSON as TEXT)."""
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (memoryview, bytearray)):
        return bytes(value)
    raise TypeError(f"payload stored as {type(value).__name__}, not bytes")


SUCCEEDED, RETRY, FAILED, CANCELLED, RELEASED = "S", "R", "F", "C", "L"
"""The kind of an outcome as the SQL and Lua that apply it name it."""


class FlatOutcome(NamedTuple):
    """One outcome to write, as flat fields. Only the fields of its ``kind`` are set."""

    job_id: str
    token: str
    """The claim's lease token: the write applies only while the job still holds it."""
    kind: str
    """``S`` succeeded, ``R`` retry, ``F`` failed, ``C`` cancelled, ``L`` released."""
    result: bytes | None = None
    """``S``: the encoded result."""
    error: bytes | None = None
    """``R`` and ``F``: the error, as ``encode_error`` stores it."""
    run_at: float | None = None
    """``R``: when to run again, on this process's clock (for brokers on the local clock)."""
    delay_s: float | None = None
    """``R``: how long from now (at least 0), for brokers that add it to a server's clock, so
    a worker whose clock is skewed still retries after the delay it asked for."""


def flatten_outcome(finish: Finish, now: float) -> FlatOutcome:
    """``finish`` as a ``FlatOutcome``; ``now`` is this process's clock (``time.time()``).

    >>> from taskmill.job import Claim
    >>> retry = RetryAt(run_at=15.0, error=ErrorInfo("ValueError", "bad"))
    >>> flat = flatten_outcome(Finish(Claim("j1", "t1"), retry), now=10.0)
    >>> flat.kind, flat.run_at, flat.delay_s, flat.error
    ('R', 15.0, 5.0, b'{"type":"ValueError","message":"bad","traceback":""}')
    """
    o, job_id, token = finish.outcome, finish.claim.job_id, finish.claim.token
    if isinstance(o, Succeeded):
        return FlatOutcome(job_id, token, SUCCEEDED, result=o.result)
    if isinstance(o, RetryAt):
        error = encode_error(o.error)
        return FlatOutcome(job_id, token, RETRY, None, error, o.run_at, max(0.0, o.run_at - now))
    if isinstance(o, Failed):
        return FlatOutcome(job_id, token, FAILED, error=encode_error(o.error))
    if isinstance(o, Cancelled):
        return FlatOutcome(job_id, token, CANCELLED)
    if isinstance(o, Released):
        return FlatOutcome(job_id, token, RELEASED)
    raise TypeError(f"unknown outcome {o!r}")  # pragma: no cover - the outcome set is closed


def flatten_outcomes(finishes: Sequence[Finish], now: float) -> list[FlatOutcome]:
    """Every outcome of a batch, in order (see ``flatten_outcome``)."""
    return [flatten_outcome(f, now) for f in finishes]
