"""Long payloads on SQLite live in a table of their own (schema 7), written once: a job's row
is rewritten whole at its claim, its progress reports and its finish, and with the payload in
it a 250 KB job cost three 250 KB writes (docs/reliability.md, T9). What a user sees does not
change: the job runs with its arguments, lists and reads with its payload, and deleting it
deletes its payload."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from taskmill import App, JobState
from taskmill.brokers.sqlite import schema

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "jobs.db"


@pytest.fixture
def app(db: Path) -> Iterator[App]:
    app = App(f"sqlite:///{db}")

    @app.task(name="echo")
    def echo(text: str) -> int:
        return len(text)

    yield app
    app.close()


def stored(db: Path, job_id: str) -> tuple[bytes, list[bytes]]:
    """The job row's own payload, and the payloads stored apart for it."""
    with closing(sqlite3.connect(db)) as conn:
        seq, inline = conn.execute(
            "SELECT seq, payload FROM taskmill_jobs WHERE id = ?", (job_id,)
        ).fetchone()
        apart = [
            row[0]
            for row in conn.execute("SELECT payload FROM taskmill_payloads WHERE seq = ?", (seq,))
        ]
    return inline, apart


def payload_rows(db: Path) -> int:
    with closing(sqlite3.connect(db)) as conn:
        return int(conn.execute("SELECT count(*) FROM taskmill_payloads").fetchone()[0])


def test_a_long_payload_is_stored_apart_once_and_the_job_runs_with_it(app: App, db: Path) -> None:
    text = "x" * 100_000
    handle = app.send_task("echo", [text])
    inline, apart = stored(db, handle.id)
    assert inline == b"" and len(apart) == 1
    assert len(apart[0]) > schema.PAYLOAD_APART_BYTES
    assert app.get_job(handle.id).payload == apart[0]  # reads see it where it is
    assert [j.payload for j in app.list_jobs().jobs] == [apart[0]]

    assert app.run_until_idle() == 1
    job = app.get_job(handle.id)
    assert job.state is JobState.SUCCEEDED, job.error
    assert handle.result(timeout=5) == 100_000  # the worker decoded the whole text
    assert stored(db, handle.id) == (b"", apart)  # the claim and finish left it alone

    assert app.delete_jobs(state="succeeded") == [handle.id]
    assert payload_rows(db) == 0  # the row's delete took its payload


def test_a_short_payload_stays_in_its_row(app: App, db: Path) -> None:
    handle = app.send_task("echo", ["short"])
    inline, apart = stored(db, handle.id)
    assert inline == app.get_job(handle.id).payload and inline != b"" and apart == []
    assert app.run_until_idle() == 1
    assert handle.result(timeout=5) == 5


def test_a_job_sent_again_keeps_one_payload(app: App, db: Path) -> None:
    echo = app.get_task("echo").options(job_id="same-job")
    first, again = echo.send("y" * 10_000), echo.send("y" * 10_000)
    assert first.id == again.id == "same-job"
    inline, apart = stored(db, "same-job")
    assert inline == b"" and len(apart) == 1
    assert payload_rows(db) == 1


def test_a_long_payload_stored_in_its_row_by_an_older_version_still_runs(
    app: App, db: Path
) -> None:
    app.open()  # the schema, then a row as version 6 wrote it: the payload inline
    text = "z" * 50_000
    payload = f'[["{text}"],{{}}]'.encode()
    with closing(sqlite3.connect(db, isolation_level=None)) as conn:
        conn.execute(
            "INSERT INTO taskmill_jobs (id, task, queue, state, payload, run_at, enqueued_at) "
            "VALUES ('old-long', 'echo', 'default', 'queued', ?, 1.0, 1.0)",
            (payload,),
        )
    assert app.get_job("old-long").payload == payload
    assert app.run_until_idle() == 1
    job = app.get_job("old-long")
    assert job.state is JobState.SUCCEEDED and job.payload == payload
    assert app.job("old-long").result(timeout=5) == 50_000
    assert app.delete_jobs(state="succeeded") == ["old-long"]
