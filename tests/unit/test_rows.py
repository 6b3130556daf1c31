"""The row mapper and the outcome encoder that every broker shares (``brokers/_rows.py``)."""

from __future__ import annotations

import msgspec
import pytest

from taskmill.brokers._rows import (
    JOB_COLUMNS,
    RECOVERED_ERROR_TYPE,
    FlatOutcome,
    decode_error,
    encode_error,
    flatten_outcomes,
    job_from_row,
    recovered_error,
)
from taskmill.errors import WorkerLostError
from taskmill.job import (
    Cancelled,
    Claim,
    ErrorInfo,
    Failed,
    Finish,
    Job,
    JobState,
    Released,
    RetryAt,
    Succeeded,
)

ERROR = ErrorInfo("ValueError", "bad", "Traceback ...")


def test_a_row_of_every_column_is_the_job_it_stores() -> None:
    job = Job(
        id="j1",
        task="app.add",
        queue="q",
        state=JobState.RUNNING,
        payload=b"[[1,2],{}]",
        priority=3,
        attempt=2,
        max_attempts=4,
        run_at=10.0,
        enqueued_at=9.0,
        started_at=11.0,
        timeout_s=30.0,
        key="k",
        lease_token="t",
        lease_expires_at=41.0,
        worker_id="w",
        lost_leases=1,
        cancel_requested=True,
        result=b"3",
        error=ERROR,
        progress=0.5,
        progress_message="half",
        meta={"tenant": "acme", "n": 2},
    )
    values = msgspec.structs.asdict(job)
    # what an SQL engine gives back: the error and metadata as JSON, booleans as 0 or 1,
    # blobs as memoryview (SQLite and psycopg may), states as text
    values.update(
        state="running",
        error=encode_error(ERROR),
        meta=b'{"tenant":"acme","n":2}',
        cancel_requested=1,
        payload=memoryview(b"[[1,2],{}]"),
    )
    assert job_from_row([values[c] for c in JOB_COLUMNS]) == job
    assert set(JOB_COLUMNS) == set(values), "JOB_COLUMNS names every field of a Job"


def test_a_row_without_error_meta_or_times_reads_as_none_and_empty() -> None:
    row = ["j", "t", "q", "queued", b"[]", 0, 0, 1, 1.0, 1.0] + [None] * 7
    row += [0, 0, None, None, None, None, None]
    job = job_from_row(row)
    assert job.error is None and job.meta == {} and job.started_at is None
    assert job.cancel_requested is False and job.state is JobState.QUEUED


@pytest.mark.parametrize("raw", [b"not json", "not json", b'{"type": 1}'])
def test_an_error_that_is_not_ours_is_kept_as_an_unknown_error(raw: bytes | str) -> None:
    text = raw.decode() if isinstance(raw, bytes) else raw
    assert decode_error(raw) == ErrorInfo("unknown", text)


def test_errors_round_trip_as_json() -> None:
    assert decode_error(encode_error(ERROR)) == ERROR
    assert decode_error(encode_error(ERROR).decode()) == ERROR
    assert decode_error(None) is None and decode_error(b"") is None


def test_each_outcome_flattens_to_its_kind_and_only_its_fields() -> None:
    claim = Claim("j", "tok")
    finishes = [
        Finish(claim, Succeeded(b"42")),
        Finish(claim, RetryAt(run_at=107.5, error=ERROR)),
        Finish(claim, RetryAt(run_at=90.0, error=ERROR)),
        Finish(claim, Failed(ERROR)),
        Finish(claim, Cancelled("on request")),
        Finish(claim, Released()),
    ]
    error = encode_error(ERROR)
    assert flatten_outcomes(finishes, now=100.0) == [
        FlatOutcome("j", "tok", "S", result=b"42"),
        FlatOutcome("j", "tok", "R", error=error, run_at=107.5, delay_s=7.5),
        # overdue: due now, never a negative delay
        FlatOutcome("j", "tok", "R", error=error, run_at=90.0, delay_s=0.0),
        FlatOutcome("j", "tok", "F", error=error),
        FlatOutcome("j", "tok", "C"),
        FlatOutcome("j", "tok", "L"),
    ]


def test_the_recovered_error_names_the_attempt_the_worker_and_the_count() -> None:
    assert RECOVERED_ERROR_TYPE == "taskmill.errors.WorkerLostError"
    assert RECOVERED_ERROR_TYPE.endswith(WorkerLostError.__name__)
    error = recovered_error(3, "w{lost_leases}", 2)
    assert error == ErrorInfo(
        RECOVERED_ERROR_TYPE,
        "lease expired on attempt 3 (worker w{lost_leases} stopped heartbeating); lost leases: 2",
    )
    assert "worker ? stopped" in recovered_error(1, None, 1).message
