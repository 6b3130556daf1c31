"""Per-job log lines with structured fields, the JSON and text formats, and stored
tracebacks that start at the user's code."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from taskmill import App, Backoff
from taskmill.logs import JsonFormatter, TextFormatter


@pytest.fixture
def app() -> Iterator[App]:
    app = App("memory://")
    yield app
    app.close()


def _explode(message: str) -> None:
    raise ValueError(message)


def _records(caplog: pytest.LogCaptureFixture, job_id: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "job_id", None) == job_id]


def test_each_step_of_a_job_is_logged_with_its_fields(
    app: App, caplog: pytest.LogCaptureFixture
) -> None:
    @app.task(name="add")
    def add(a: int, b: int) -> int:
        return a + b

    @app.task(name="flaky", retries=1, backoff=Backoff(base=0, cap=0, jitter=False))
    def flaky() -> None:
        _explode("kaput")

    caplog.set_level(logging.DEBUG, logger="taskmill.job")
    ok, bad = add.send(1, 2), flaky.send()
    app.run_until_idle()

    started, succeeded = _records(caplog, ok.id)
    assert (started.levelno, succeeded.levelno) == (logging.DEBUG, logging.INFO)
    assert "started: attempt 1 of 4" in started.getMessage()
    assert f"job {ok.id} (add) succeeded in " in succeeded.getMessage()
    assert (succeeded.task, succeeded.queue, succeeded.attempt) == ("add", "default", 1)  # type: ignore[attr-defined]
    assert succeeded.duration_s >= 0  # type: ignore[attr-defined]

    lines = [r for r in _records(caplog, bad.id) if r.levelno > logging.DEBUG]
    retry, failure = lines
    assert retry.levelno == logging.WARNING
    assert "attempt 1 of 2 failed" in retry.getMessage()
    assert "retrying in 0.0 s: ValueError: kaput" in retry.getMessage()
    assert (retry.error, retry.delay_s) == ("ValueError: kaput", 0.0)  # type: ignore[attr-defined]
    assert failure.levelno == logging.ERROR
    assert "failed on attempt 2 of 2" in failure.getMessage()
    assert failure.getMessage().endswith("ValueError: kaput")
    assert "in _explode" in failure.traceback  # type: ignore[attr-defined]


def test_json_lines_carry_the_fields_and_the_traceback() -> None:
    record = logging.LogRecord("taskmill.job", logging.ERROR, __file__, 1, "job %s failed",
                               ("j1",), None)  # fmt: skip
    record.job_id, record.task, record.attempt = "j1", "add", 2
    record.traceback = "Traceback (most recent call last):\n  ...\nValueError: x\n"
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "job j1 failed" and entry["level"] == "error"
    assert (entry["job_id"], entry["task"], entry["attempt"]) == ("j1", "add", 2)
    assert entry["traceback"].endswith("ValueError: x\n")
    assert entry["ts"].endswith("Z") and entry["logger"] == "taskmill.job"

    text = TextFormatter().format(record)
    assert text.splitlines()[0].endswith(f"taskmill.job [{record.process}] job j1 failed")
    assert text.splitlines()[-1] == "ValueError: x"


def test_stored_traceback_starts_at_the_users_code(app: App) -> None:
    @app.task(retries=0)
    def sync_task() -> None:
        _explode("sync")

    @app.task(retries=0)
    async def async_task() -> None:
        _explode("async")

    handles = [sync_task.send(), async_task.send()]
    app.run_until_idle()
    for handle in handles:
        error = app.get_job(handle.id).error
        assert error is not None
        frames = [line for line in error.traceback.splitlines() if line.startswith("  File ")]
        assert __file__ in frames[0], error.traceback
        assert "taskmill" not in "".join(frames).replace(__file__, ""), error.traceback
        assert "During handling" not in error.traceback
