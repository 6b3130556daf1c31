"""The SQLite file under bad conditions: read-only, locked for long, deleted under a worker; and
enqueue inside the caller's own SQLite transaction.


Each case checks the error a person would read, and that no job acknowledged to a producer is
lost: a send either raised (and stored nothing) or its job is still there and runs once the file
is usable again. Workers run in-process (``running_worker``) against the same file a second
``App`` sends to, as two processes would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from taskmill import App, BrokerError, BrokerUnavailableError, Job, JobNotFoundError, JobState
from taskmill.brokers.sqlite import SQLiteBroker
from taskmill.testing import running_worker, wait_until

from .support import HERE

T = TypeVar("T")
BUSY_MS = 200


def make_app(db: Path, **settings: float) -> App:
    app = App(f"sqlite:///{db}?busy_timeout_ms={BUSY_MS}", **settings)
    app.task(name="echo")(echo)
    return app


def echo(x: int) -> int:
    return x


def stored(app: App) -> list[Job]:
    async def jobs() -> list[Job]:
        return await (await app.abroker()).list_jobs(limit=10_000)

    return app.run_sync(jobs())


def count_rows(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute("SELECT count(*) FROM taskmill_jobs").fetchone()[0])
    finally:
        conn.close()


def count_done(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        sql = "SELECT count(*) FROM taskmill_jobs WHERE state = 'succeeded'"
        return int(conn.execute(sql).fetchone()[0])
    finally:
        conn.close()


def send_from_another_process(db: Path, x: int) -> None:
    code = (
        "import sys\n"
        "from taskmill import App\n"
        "with App(sys.argv[1]) as app:\n"
        "    app.task(name='echo')(lambda x: x).send(int(sys.argv[2]))\n"
    )
    subprocess.run([sys.executable, "-c", code, f"sqlite:///{db}", str(x)], check=True, timeout=60)


def messages(caplog: pytest.LogCaptureFixture, contains: str) -> list[str]:
    return [r.getMessage() for r in list(caplog.records) if contains in r.getMessage()]


def retry_delays(caplog: pytest.LogCaptureFixture) -> list[float]:
    found = [re.search(r"claim failed, retrying in ([\d.]+) s", m) for m in messages(caplog, "")]
    return [float(m[1]) for m in found if m]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "jobs.db"


@pytest.fixture
def apps(db: Path) -> Iterator[Callable[..., App]]:
    """Make apps on ``db`` (a producer, a worker: as separate processes would); all closed after."""
    made: list[App] = []

    def make(**settings: float) -> App:
        made.append(make_app(db, **settings))
        return made[-1]

    yield make
    for app in made:
        app.close()


# --- read-only ---------------------------------------------------------------------------------


@contextlib.contextmanager
def read_only(*paths: Path) -> Iterator[None]:
    """Make files (and directories) read-only for this process, root included.

    Mode bits do not stop root (CI runs tests as root), so as root this uses the immutable
    attribute (``chattr +i``, which binds root too); the test is skipped where neither works.
    """
    if os.geteuid() == 0:
        chattr = shutil.which("chattr")
        if chattr is None:
            pytest.skip("running as root without chattr: cannot make a file read-only")
        proc = subprocess.run([chattr, "+i", *map(str, paths)], capture_output=True, text=True)
        if proc.returncode != 0:
            subprocess.run([chattr, "-i", *map(str, paths)], capture_output=True)
            pytest.skip(f"running as root and `chattr +i` is refused: {proc.stderr.strip()}")

        def undo() -> None:
            subprocess.run([chattr, "-i", *map(str, paths)], check=True)

    else:
        modes = {p: p.stat().st_mode for p in paths}
        for p in paths:
            p.chmod(0o555 if p.is_dir() else 0o444)

        def undo() -> None:
            for p, mode in modes.items():
                p.chmod(mode)

    try:
        try:  # honesty check: the file really cannot be written by this process
            with open(paths[0], "r+b"):
                pass
        except PermissionError:
            pass
        else:
            pytest.skip(f"{paths[0]} is still writable after making it read-only")
        yield
    finally:
        undo()


def test_a_read_only_file_refuses_sends_with_a_clear_error_and_loses_nothing(
    apps: Callable[..., App], db: Path
) -> None:
    before = apps()
    kept = before.tasks["echo"].send(1)
    before.close()
    producer = apps()
    with read_only(db):
        with pytest.raises(BrokerError) as info:
            producer.tasks["echo"].send(2)
        assert str(info.value) == (
            f"SQLite database {db} is read-only (attempt to write a readonly database); "
            "nothing was written"
        )
        assert not isinstance(info.value, BrokerUnavailableError)
        with pytest.raises(BrokerError, match=r"is read-only"):
            producer.tasks["echo"].send_many([(3,), (4,)])
        assert producer.get_job(kept.id).state is JobState.QUEUED  # reading still works
    # writable again: the same producer recovers, and only the acknowledged job was stored
    assert [j.id for j in stored(producer)] == [kept.id]
    later = producer.tasks["echo"].send(5)
    with running_worker(apps()):
        assert kept.result(timeout=20) == 1
        assert later.result(timeout=20) == 5
    assert count_rows(db) == 2


def test_a_read_only_directory_makes_opening_fail_clearly_and_loses_nothing(
    apps: Callable[..., App], db: Path, tmp_path: Path
) -> None:
    """With the directory read-only too, SQLite cannot create the WAL's -shm file: a permanent
    error, named as such (not "unavailable": waiting does not help)."""
    send_from_another_process(db, 1)  # which exits cleanly: no -wal or -shm file is left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jobs.db"]
    producer = apps()
    with read_only(db, tmp_path):
        with pytest.raises(BrokerError) as info:
            producer.tasks["echo"].send(2)
        assert str(info.value) == (
            f"SQLite database {db}: directory {tmp_path} is not writable: SQLite needs to "
            "create the -wal and -shm files beside the database (unable to open database file)"
        )
        assert not isinstance(info.value, BrokerUnavailableError)
        assert info.value.permanent
    later = producer.tasks["echo"].send(3)  # usable once the directory is writable again
    assert sorted(j.payload for j in stored(producer)) == [b"[[1],{}]", b"[[3],{}]"]
    with running_worker(apps()):
        assert later.result(timeout=20) == 3
        wait_until(lambda: count_done(db) == 2, what="both jobs to run", timeout=20)


def run_until_idle_within(app: App, seconds: float) -> BaseException | None:
    """``app.run_until_idle()`` on a thread: what it raised (None if it returned); fails if it
    is still running after ``seconds`` (spinning on an error it cannot get past)."""
    raised: list[BaseException | None] = []

    def target() -> None:
        try:
            app.run_until_idle()
        except BaseException as exc:
            raised.append(exc)
        else:
            raised.append(None)

    thread = threading.Thread(target=target, name="run-until-idle", daemon=True)
    thread.start()
    thread.join(seconds)
    assert raised, f"run_until_idle() still running after {seconds} s"
    return raised[0]


def test_run_until_idle_on_a_read_only_file_raises_the_cause_instead_of_spinning(
    apps: Callable[..., App], db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    producer = apps()
    kept = producer.tasks["echo"].send(7)
    with read_only(db):
        error = run_until_idle_within(apps(), 10)
    assert isinstance(error, BrokerError) and not isinstance(error, BrokerUnavailableError)
    assert error.permanent
    assert str(error) == (
        f"SQLite database {db} is read-only (attempt to write a readonly database); "
        "nothing was written"
    )
    assert retry_delays(caplog) == []  # stopped at the first claim, no retries logged
    assert kept.status() is JobState.QUEUED  # the job is still there, for a usable worker
    with running_worker(apps()):
        assert kept.result(timeout=20) == 7
    assert kept.info().attempt == 1


@pytest.mark.parametrize("what", ["file", "directory"])
def test_a_worker_process_on_an_unwritable_database_exits_naming_the_cause(
    db: Path, tmp_path: Path, what: str
) -> None:
    """``taskmill worker`` as a user runs it: it exits at once, non-zero, with one line naming
    the cause, whether the file is read-only or its directory is."""
    send_from_another_process(db, 1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKMILL_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    env["TASKMILL_URL"] = f"sqlite:///{db}"
    paths = (db,) if what == "file" else (db, tmp_path)
    with read_only(*paths):
        proc = subprocess.run(
            [sys.executable, "-m", "taskmill", "worker", "cliapp:app", "--log-level", "error"],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=30,
        )
    cause = (
        "is read-only (attempt to write a readonly database)"
        if what == "file"
        else "is not writable: SQLite needs to create the -wal and -shm files"
    )
    assert proc.returncode == 3, proc.stderr  # stopped on an error no restart fixes
    # the process's last word: "worker ID stopped: …" or "worker ID cannot start: …"
    stopped = [line for line in proc.stderr.splitlines() if _FINAL.search(line)]
    assert len(stopped) == 1 and " ERROR " in stopped[0] and cause in stopped[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert "retrying" not in proc.stderr


_FINAL = re.compile(r"worker \S+ (stopped|cannot start): ")


def test_supervised_workers_on_a_read_only_file_are_not_restarted(db: Path, tmp_path: Path) -> None:
    """``-p 2``: each child stops on the permanent error, and the supervisor, knowing that a
    restart would fail the same way, exits instead of restarting them with back-off forever."""
    send_from_another_process(db, 1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKMILL_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    env["TASKMILL_URL"] = f"sqlite:///{db}"
    with read_only(db):
        proc = subprocess.run(
            [sys.executable, "-m", "taskmill", "worker", "cliapp:app", "-p", "2"],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=30,
        )
    assert proc.returncode == 3, proc.stderr
    stopped = [
        line for line in proc.stderr.splitlines() if _FINAL.search(line) and " ERROR " in line
    ]
    assert stopped and all("is read-only" in line for line in stopped), proc.stderr
    assert "exited with an error no restart fixes (exit code 3); not restarting it" in proc.stderr
    assert "restarting in" not in proc.stderr
    assert "Traceback" not in proc.stderr


# --- a path that cannot hold the file ------------------------------------------------------------


def bad_path(tmp_path: Path, case: str) -> tuple[Path, str]:
    """A database path that cannot be a file, and the cause its error must name."""
    (tmp_path / "a-file").write_text("not a directory")
    (tmp_path / "a-dir").mkdir()
    return {
        "under a file": (
            tmp_path / "a-file" / "jobs.db",
            f"{tmp_path / 'a-file'} is a file, not a directory",
        ),
        "deeper under a file": (
            tmp_path / "a-file" / "sub" / "jobs.db",
            f"{tmp_path / 'a-file'} is a file, not a directory",
        ),
        "in a missing directory": (
            tmp_path / "gone" / "jobs.db",
            f"{tmp_path / 'gone'} does not exist",
        ),
        "a directory": (tmp_path / "a-dir", "it is a directory"),
    }[case]


BAD_PATHS = ["under a file", "deeper under a file", "in a missing directory", "a directory"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", BAD_PATHS)
def test_a_path_that_cannot_hold_the_database_is_a_permanent_error_naming_it(
    tmp_path: Path, case: str
) -> None:
    path, cause = bad_path(tmp_path, case)
    app = make_app(path)
    try:
        with pytest.raises(BrokerError) as info:
            app.tasks["echo"].send(1)
        assert str(info.value) == f"cannot open SQLite database {path}: {cause}"
        assert info.value.permanent and not isinstance(info.value, BrokerUnavailableError)
    finally:
        app.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", ["under a file", "a directory"])
def test_the_cli_and_a_worker_say_in_one_line_why_the_path_cannot_hold_the_database(
    tmp_path: Path, case: str
) -> None:
    path, cause = bad_path(tmp_path, case)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKMILL_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    env["TASKMILL_URL"] = f"sqlite:///{path}"

    def taskmill(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "taskmill", *args],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=30,
        )  # fmt: skip

    queues = taskmill("queues")
    assert queues.returncode == 1, queues.stderr
    assert queues.stderr.splitlines() == [f"error: cannot open SQLite database {path}: {cause}"]
    worker = taskmill("worker", "cliapp:app", "--log-level", "error")
    assert worker.returncode == 3, worker.stderr  # no restart fixes it
    stopped = [line for line in worker.stderr.splitlines() if _FINAL.search(line)]
    assert len(stopped) == 1 and f"cannot open SQLite database {path}: {cause}" in stopped[0]
    assert "Traceback" not in worker.stderr


# --- locked for long -----------------------------------------------------------------------------


@contextlib.contextmanager
def exclusive_lock(db: Path) -> Iterator[sqlite3.Connection]:
    """Another connection holding the write lock (``BEGIN EXCLUSIVE``) until the block ends."""
    conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        yield conn
        conn.execute("COMMIT")
    finally:
        conn.close()


def test_a_send_to_a_locked_file_fails_after_the_busy_timeout_and_stores_nothing(
    apps: Callable[..., App], db: Path
) -> None:
    producer = apps()
    kept = producer.tasks["echo"].send(1)
    with exclusive_lock(db):
        started = time.monotonic()
        with pytest.raises(BrokerUnavailableError) as info:
            producer.tasks["echo"].send(2)
        waited = time.monotonic() - started
        assert str(info.value) == (
            f"SQLite database {db} stayed locked for more than {BUSY_MS} ms "
            "(database is locked); nothing was written"
        )
        assert BUSY_MS / 1000 * 0.9 <= waited < 5.0
        with pytest.raises(BrokerUnavailableError):
            producer.tasks["echo"].send_many([(3,), (4,)])
        assert producer.get_job(kept.id).state is JobState.QUEUED  # WAL readers do not wait
    assert [j.id for j in stored(producer)] == [kept.id]
    assert producer.tasks["echo"].send(5).status() is JobState.QUEUED  # and usable again


def test_a_worker_on_a_locked_file_backs_off_and_runs_the_job_once_released(
    apps: Callable[..., App], db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    producer = apps()
    kept = producer.tasks["echo"].send(3)
    with exclusive_lock(db) as lock, running_worker(apps()):
        wait_until(lambda: len(retry_delays(caplog)) >= 3, what="three failed claims", timeout=20)
        assert kept.status() is JobState.QUEUED
        lock.execute("COMMIT")
        assert kept.result(timeout=20) == 3
        assert producer.tasks["echo"].send(4).result(timeout=20) == 4
        lock.execute("BEGIN")  # for exclusive_lock's COMMIT
    failure = messages(caplog, "claim failed")[0]
    assert failure.endswith(
        f"SQLite database {db} stayed locked for more than {BUSY_MS} ms (database is locked); "
        "nothing was written"
    )
    delays = retry_delays(caplog)
    assert delays[0] < delays[1] < delays[2]
    assert kept.info().attempt == 1


def test_an_outcome_that_cannot_be_written_while_locked_is_kept_and_written_later(
    apps: Callable[..., App], db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A job that finishes while the file is locked is not lost, nor run a second time."""
    producer = apps()
    release = threading.Event()
    runs: list[int] = []

    worker_app = apps()

    @worker_app.task(name="gated")
    def gated(x: int) -> int:
        runs.append(x)
        release.wait(20)
        return x * 10

    producer.task(name="gated")(lambda x: x)
    with running_worker(worker_app):
        handle = producer.tasks["gated"].send(4)
        wait_until(lambda: handle.status() is JobState.RUNNING, what="the job to start", timeout=20)
        with exclusive_lock(db):
            release.set()
            wait_until(
                lambda: messages(caplog, "outcomes failed, will retry"),
                what="a failed flush",
                timeout=20,
            )
            assert handle.status() is JobState.RUNNING
        assert handle.result(timeout=20) == 40
    assert runs == [4]
    assert handle.info().attempt == 1
    assert "stayed locked for more than" in messages(caplog, "outcomes failed, will retry")[0]


# --- deleted under a running worker --------------------------------------------------------------


@pytest.mark.parametrize("with_wal", [False, True], ids=["db-file-only", "db-wal-and-shm"])
def test_a_file_deleted_under_a_running_worker_is_reopened_and_later_sends_run(
    apps: Callable[..., App], db: Path, caplog: pytest.LogCaptureFixture, with_wal: bool
) -> None:
    producer = apps()
    echo = producer.tasks["echo"]
    with running_worker(apps()):
        assert echo.send(1).result(timeout=20) == 1
        for path in [db, Path(f"{db}-wal"), Path(f"{db}-shm")] if with_wal else [db]:
            os.unlink(path)
        after = echo.send(2)  # the producer notices, logs, and makes a fresh file
        assert after.result(timeout=20) == 2  # the worker reopened it too
        assert [h.result(timeout=20) for h in echo.send_many([(3,), (4,)])] == [3, 4]
    reopened = [
        r
        for r in caplog.records
        if r.getMessage()
        == f"SQLite file {db} was deleted or replaced under this process; reopening it "
        "(jobs stored in the old file are gone with it)"
    ]
    assert {r.levelno for r in reopened} == {logging.ERROR}
    assert len(reopened) == 2  # once per broker: the producer's and the worker's
    assert db.is_file()
    assert count_rows(db) == 3  # the fresh file holds exactly what was sent after the deletion


def open_at_once(brokers: list[SQLiteBroker]) -> list[BaseException]:
    start = threading.Barrier(len(brokers))
    errors: list[BaseException] = []

    def open_one(broker: SQLiteBroker) -> None:
        start.wait()
        try:
            broker.open_blocking()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_one, args=(b,)) for b in brokers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_several_brokers_opening_a_new_file_at_once_all_succeed(tmp_path: Path) -> None:
    """Regression: switching a brand-new file to WAL reported "locked" at once (no busy
    handler on that path) when another connection was creating it at the same moment, so a
    worker and a producer (or ``-p 2``) starting on a new file could fail to start."""
    for round_ in range(25):
        brokers = [SQLiteBroker(f"sqlite:///{tmp_path / f'new-{round_}.db'}") for _ in range(3)]
        errors = open_at_once(brokers)
        for broker in brokers:
            asyncio.run(broker.close())
        assert errors == [], f"round {round_}: {errors[0]!r}"


# --- transactional enqueue -----------------------------------------------------------------------


@pytest.fixture
def own_conn(db: Path, apps: Callable[..., App]) -> Iterator[sqlite3.Connection]:
    """The caller's own connection on the broker's file, with a table of its own."""
    apps().open()  # the file and its schema exist before the caller's transaction
    conn = sqlite3.connect(db, timeout=10)
    conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY)")
    yield conn
    conn.close()


def test_jobs_sent_in_a_rolled_back_transaction_do_not_exist(
    apps: Callable[..., App], own_conn: sqlite3.Connection, db: Path
) -> None:
    app = apps()
    echo = app.tasks["echo"]
    own_conn.execute("INSERT INTO orders (id) VALUES (1)")  # opens the caller's transaction
    one = echo.options(connection=own_conn).send(1)
    many = echo.send_many([(2,), (3,)], connection=own_conn)
    with pytest.raises(JobNotFoundError):
        app.get_job(one.id)  # not visible to others before the commit
    own_conn.rollback()
    for handle in (one, *many):
        with pytest.raises(JobNotFoundError):
            app.get_job(handle.id)
    assert stored(app) == []
    assert own_conn.execute("SELECT count(*) FROM orders").fetchone()[0] == 0
    with running_worker(apps()) as worker:
        assert echo.send(4).result(timeout=20) == 4
    assert worker.jobs_done == 1


def test_jobs_sent_in_a_committed_transaction_exist_and_run(
    apps: Callable[..., App], own_conn: sqlite3.Connection
) -> None:
    app = apps()
    echo = app.tasks["echo"]
    own_conn.execute("INSERT INTO orders (id) VALUES (1)")
    one = echo.options(connection=own_conn, priority=2).send(1)
    cursor = own_conn.cursor()
    many = echo.send_many([(2,), (3,)], connection=cursor)  # a cursor works too
    own_conn.commit()
    assert app.get_job(one.id).priority == 2
    with running_worker(apps()):
        assert [h.result(timeout=20) for h in (one, *many)] == [1, 2, 3]
    assert own_conn.execute("SELECT count(*) FROM orders").fetchone()[0] == 1


def test_an_explicit_transaction_on_an_autocommit_connection(
    apps: Callable[..., App], db: Path
) -> None:
    app = apps()
    app.open()
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("BEGIN")
        rolled_back = app.tasks["echo"].options(connection=conn).send(1)
        conn.execute("ROLLBACK")
        conn.execute("BEGIN")
        committed = app.tasks["echo"].options(connection=conn).send(2)
        conn.execute("COMMIT")
    finally:
        conn.close()
    with pytest.raises(JobNotFoundError):
        app.get_job(rolled_back.id)
    assert app.get_job(committed.id).state is JobState.QUEUED


def test_a_connection_that_is_not_sqlite_is_rejected(apps: Callable[..., App]) -> None:
    app = apps()
    with pytest.raises(TypeError, match=r"connection= takes a sqlite3\.Connection or Cursor"):
        app.tasks["echo"].options(connection="not a connection").send(1)
    assert stored(app) == []


def test_a_connection_on_another_taskmill_file_is_rejected(
    apps: Callable[..., App], tmp_path: Path
) -> None:
    app = apps()
    with App(f"sqlite:///{tmp_path / 'other.db'}") as other:
        other.open()
    conn = sqlite3.connect(tmp_path / "other.db")
    try:
        with pytest.raises((BrokerError, TypeError)):
            app.tasks["echo"].options(connection=conn).send(1)
    finally:
        conn.commit()
        conn.close()


# --- the wake-up sockets -------------------------------------------------------------------------


def test_a_temp_dir_too_deep_for_a_socket_path_still_runs_jobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long TMPDIR made every wake-up socket path longer than the 108 bytes a Unix socket
    allows: each claim failed, retried every few seconds for ever, and no job ran."""
    from taskmill.brokers.sqlite.wakeup import channel_dir

    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(deep))
    db = tmp_path / "jobs.db"
    assert len(os.fsencode(os.path.join(channel_dir(str(db)), "x" * 12))) <= 107
    app = make_app(db)
    with running_worker(app):
        assert app.tasks["echo"].send(7).result(timeout=10) == 7
    app.close()


def test_a_socket_that_cannot_be_bound_leaves_claims_to_poll(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from taskmill.brokers.sqlite.wakeup import WakeListener

    blocked = tmp_path / "a-file-not-a-directory"
    blocked.write_text("")
    with caplog.at_level(logging.WARNING, logger="taskmill.broker"):
        listener = WakeListener(str(blocked))
    assert "SQLite wake-ups are off for this process" in caplog.text
    assert asyncio.run(listener.wait(0.01)) is False
    assert listener.drain() is False
    listener.close()
