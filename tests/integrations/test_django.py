"""Django's tasks framework on taskmill, end to end: a real Django project
(``tests/integrations/djangoproject``: settings, a ``shop`` app with models and ``@task``
functions, its own SQLite database) enqueues through ``TaskmillBackend``, and real
``taskmill worker taskmill.integrations.django:app`` processes run the tasks.

Django runs in subprocesses only (each step a short ``python -c`` with the project's
settings): Django's settings are configured once per process, and other tests of this suite
(``tests/web/test_pages_django.py``) configure theirs in the pytest process. The test process
itself reads the broker with a plain taskmill ``App``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any

import pytest

from integration.support import Workers, all_jobs, wait_registered
from servers import PostgresServer, RedisServer
from taskmill import App, JobState
from taskmill.testing import wait_until

PROJECT = Path(__file__).resolve().parent / "djangoproject"
WORKER_APP = "taskmill.integrations.django:app"

PRELUDE = """
import asyncio, json, time
from datetime import timedelta

import django

django.setup()

from django.db import transaction
from django.utils import timezone
from taskmill.integrations.django._compat import (
    InvalidTaskError, TaskResultDoesNotExist, task_backends,
)
from taskmill.testing import wait_until
from shop.models import Note, Order
from shop.tasks import add, add_later, attempt, bad_result, fail, flaky, note, ship


def finished(task, result_id):
    return wait_until(
        lambda: (r := task.get_result(result_id)).is_finished and r,
        timeout=30,
        what=f"task result {result_id} to finish",
    )


def out(value):
    print("RESULT " + json.dumps(value, default=str))
"""

_prefixes = count()


@dataclass
class DjangoProject:
    """The test project with its Django database and taskmill broker in ``tmp``."""

    tmp: Path
    url: str
    enqueue: str = "now"
    """How ``enqueue`` inside a transaction sends: ``now``, ``on_commit``, ``in_transaction``."""
    retries: int = 0
    database: str = ""
    """Django's database: a SQLite file or a ``postgresql://`` URL (default: a file in tmp)."""

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TASKMILL_", "DJANGO_"))}
        env.update(self.django_env())
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT), env.get("PYTHONPATH")]))
        env["TASKMILL_URL"] = self.url
        return env

    def django_env(self) -> dict[str, str]:
        return {
            "DJANGO_SETTINGS_MODULE": "project.settings",
            "DJANGO_DB": self.database or str(self.tmp / "django.db"),
            "TASKMILL_ENQUEUE": self.enqueue,
            "TASKMILL_RETRIES": str(self.retries),
        }

    def run(self, code: str) -> Any:
        """Run ``code`` in a Django process of the project; what it passed to ``out()``."""
        proc = subprocess.run(
            [sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
            env=self.env(),
            cwd=self.tmp,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        assert len(lines) == 1, proc.stdout + proc.stderr
        return json.loads(lines[0].removeprefix("RESULT "))


@pytest.fixture(params=["sqlite", "redis"])
def broker_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    server: RedisServer = request.getfixturevalue("redis_server")
    return f"{server.url}?prefix=django-{os.getpid()}-{next(_prefixes)}:"


def _project(
    tmp_path: Path, url: str, *, enqueue: str = "now", retries: int = 0, database: str = ""
) -> DjangoProject:
    project = DjangoProject(tmp_path, url, enqueue, retries, database)
    project.run(
        "from django.core.management import call_command\n"
        "call_command('migrate', run_syncdb=True, verbosity=0)\nout(True)"
    )
    return project


@pytest.fixture
def project(tmp_path: Path, broker_url: str) -> DjangoProject:
    return _project(tmp_path, broker_url)


@pytest.fixture
def sqlite_project(tmp_path: Path) -> DjangoProject:
    return _project(tmp_path, f"sqlite:///{tmp_path / 'jobs.db'}")


@pytest.fixture
def observer(project: DjangoProject) -> Iterator[App]:
    """A plain taskmill app on the project's broker, to look at its jobs from outside."""
    with App(project.url) as app:
        yield app


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    procs = Workers(tmp_path, WORKER_APP)
    yield procs
    procs.close()


def start_worker(project: DjangoProject, workers: Workers, app: App, *args: str) -> None:
    proc = workers.start(project.url, *args, **project.django_env(), PYTHONPATH=str(PROJECT))
    wait_registered(app, proc, workers)


@pytest.mark.timeout(90)
def test_a_task_runs_on_a_worker_and_its_result_comes_back(
    project: DjangoProject, observer: App, workers: Workers
) -> None:
    start_worker(project, workers, observer, "-c", "2")
    got = project.run(
        """
        sent = add.enqueue(2, 3)
        ready = add.get_result(sent.id).status
        done = finished(add, sent.id)
        context = finished(attempt, attempt.enqueue("first").id)

        async def async_side():
            sent = await add_later.aenqueue(20, 22)
            for _ in range(1500):
                result = await add_later.aget_result(sent.id)
                if result.is_finished:
                    return result.status, result.return_value
                await asyncio.sleep(0.02)

        out({
            "sent": [sent.status, sent.args, sent.id],
            "ready": ready,
            "done": [done.status, done.return_value, done.attempts, done.args],
            "times": done.enqueued_at <= done.started_at <= done.finished_at,
            "aware": timezone.is_aware(done.finished_at),
            "context": [context.return_value, context.id],
            "async": asyncio.run(async_side()),
        })
        """
    )
    job_id = got["sent"][2]
    assert got["sent"][:2] == ["READY", [2, 3]]
    assert got["ready"] in ("READY", "RUNNING", "SUCCESSFUL")
    assert got["done"] == ["SUCCESSFUL", 5, 1, [2, 3]]
    assert got["times"] and got["aware"]
    label, attempt_seen = got["context"]
    assert label == {"label": "first", "attempt": 1, "id": attempt_seen}
    assert got["async"] == ["SUCCESSFUL", 42]
    job = observer.get_job(job_id)
    assert (job.task, job.state, job.queue) == ("shop.tasks.add", JobState.SUCCEEDED, "default")


@pytest.mark.timeout(90)
def test_a_failing_task_shows_its_error(
    project: DjangoProject, observer: App, workers: Workers
) -> None:
    start_worker(project, workers, observer)
    got = project.run(
        """
        failed = finished(fail, fail.enqueue("out of stock").id)
        try:
            failed.return_value
        except ValueError as exc:
            no_value = str(exc)
        unsendable = finished(bad_result, bad_result.enqueue().id)
        out({
            "failed": [failed.status, failed.attempts, failed.task.queue_name, no_value],
            "error": [failed.errors[0].exception_class.__name__, failed.errors[0].traceback],
            "unsendable": [unsendable.status, unsendable.errors[0].traceback],
        })
        """
    )
    assert got["failed"] == ["FAILED", 1, "mail", "Task failed"]
    error_class, traceback = got["error"]
    assert error_class == "ValueError"
    assert "ValueError: out of stock" in traceback and "shop/tasks.py" in traceback
    status, traceback = got["unsendable"]
    assert status == "FAILED"
    assert "task 'shop.tasks.bad_result': its return value is a set" in traceback


@pytest.mark.timeout(90)
def test_a_task_that_failed_once_is_retried_when_the_backend_allows_it(
    tmp_path: Path, workers: Workers
) -> None:
    project = _project(tmp_path, f"sqlite:///{tmp_path / 'jobs.db'}", retries=1)
    with App(project.url) as observer:
        start_worker(project, workers, observer)
        got = project.run(
            """
            done = finished(flaky, flaky.enqueue("parcel 7").id)
            gave_up = finished(fail, fail.enqueue("still out of stock").id)
            out({
                "done": [done.status, done.return_value, done.attempts],
                "gave_up": [gave_up.status, gave_up.attempts, gave_up.errors[0].traceback],
            })
            """
        )
    assert got["done"] == ["SUCCESSFUL", "parcel 7 on attempt 2", 2]
    status, attempts, traceback = got["gave_up"]
    assert (status, attempts) == ("FAILED", 2)
    assert "ValueError: still out of stock" in traceback


@pytest.fixture(params=["on_commit-sqlite", "in_transaction-sqlite", "in_transaction-postgres"])
def tied_project(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DjangoProject]:
    """A project whose sends inside a transaction wait for its commit (``on_commit``, broker
    and Django on two SQLite files) or are written in it (``in_transaction``: the broker is
    Django's own database, a SQLite file or a PostgreSQL database)."""
    enqueue, kind = request.param.split("-")
    if kind == "sqlite":
        django_db = tmp_path / ("jobs.db" if enqueue == "in_transaction" else "django.db")
        yield _project(
            tmp_path, f"sqlite:///{tmp_path / 'jobs.db'}", enqueue=enqueue, database=str(django_db)
        )
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    name = f"django_{uuid.uuid4().hex[:12]}"
    url = server.create_database(name)
    try:
        yield _project(tmp_path, url, enqueue=enqueue, database=url)
    finally:
        with server.connect() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.timeout(90)
def test_a_send_tied_to_a_transaction_happens_once_on_commit_and_never_on_rollback(
    tied_project: DjangoProject, workers: Workers
) -> None:
    project = tied_project
    got = project.run(
        """
        class Rollback(Exception):
            pass

        try:
            with transaction.atomic():
                lost = ship.enqueue(Order.objects.create(ref="A-1").id)
                raise Rollback
        except Rollback:
            pass
        with transaction.atomic():
            order = Order.objects.create(ref="A-2")
            kept = ship.enqueue(order.id)
            try:
                ship.get_result(kept.id)
                before_commit = "visible"
            except TaskResultDoesNotExist:
                before_commit = "not visible"
        try:
            ship.get_result(lost.id)
            rolled_back = "visible"
        except TaskResultDoesNotExist:
            rolled_back = "not visible"
        out({
            "ids": [kept.id, order.id],
            "before_commit": before_commit,
            "rolled_back": rolled_back,
            "after_commit": ship.get_result(kept.id).status,
            "outside": ship.get_result(ship.enqueue(order.id).id).status,
        })
        """
    )
    kept_id, order_id = got["ids"]
    assert got["before_commit"] == "not visible"
    assert got["rolled_back"] == "not visible"
    assert got["after_commit"] == "READY"
    assert got["outside"] == "READY"  # outside a transaction: sent at once
    with App(project.url) as observer:
        jobs = all_jobs(observer)
        assert len(jobs) == 2 and kept_id in jobs
        start_worker(project, workers, observer)
        wait_until(
            lambda: all(j.state is JobState.SUCCEEDED for j in all_jobs(observer).values()),
            timeout=30,
            what="both jobs to succeed",
        )
        assert len(all_jobs(observer)) == 2
    shipped = project.run(
        f"""
        out([Order.objects.get(id={order_id}).shipped, ship.get_result({kept_id!r}).return_value])
        """
    )
    assert shipped == [True, "A-2"]


@pytest.mark.timeout(90)
def test_priority_and_run_after_are_honoured(
    project: DjangoProject, observer: App, workers: Workers
) -> None:
    ids = project.run(
        """
        sent = [
            note.using(priority=-50).enqueue("low"),
            note.enqueue("normal"),
            note.using(priority=100).enqueue("high"),
        ]
        out([r.id for r in sent])
        """
    )
    start_worker(project, workers, observer, "-c", "1")
    got = project.run(
        f"""
        for result_id in {ids!r}:
            finished(note, result_id)
        first = list(Note.objects.order_by("id").values_list("label", flat=True))
        run_after = timezone.now() + timedelta(seconds=3)
        later = note.using(priority=100, run_after=run_after).enqueue("later")
        now = note.using(priority=-100).enqueue("now")
        later_result, now_result = finished(note, later.id), finished(note, now.id)
        out({{
            "first": first,
            "all": list(Note.objects.order_by("id").values_list("label", flat=True)),
            "later_not_early": later_result.started_at >= run_after - timedelta(milliseconds=1),
            "later_ran_after_now": later_result.started_at >= now_result.finished_at,
            "task_run_after": abs(note.get_result(later.id).task.run_after - run_after)
            < timedelta(milliseconds=1),
        }})
        """
    )
    assert got["first"] == ["high", "normal", "low"]
    assert got["all"] == ["high", "normal", "low", "now", "later"]
    assert got["later_not_early"] and got["later_ran_after_now"]
    assert got["task_run_after"]


@pytest.mark.timeout(60)
def test_bad_arguments_are_refused_naming_the_task_and_nothing_is_sent(
    sqlite_project: DjangoProject,
) -> None:
    got = sqlite_project.run(
        """
        import datetime

        errors = []
        for call in (
            lambda: add.enqueue(1),
            lambda: add.enqueue(1, c=2, b=3),
            lambda: add.enqueue(1, datetime.date(2026, 1, 2)),
            lambda: add.enqueue(1, b=[0.5, float("nan")]),
            lambda: add.enqueue(1, {1: "one"}),
            lambda: add.enqueue(1, b"\\xff"),
            lambda: add.using(priority=101).enqueue(1, 2),
            lambda: add.using(queue_name="nowhere").enqueue(1, 2),
            lambda: add.get_result("no-such-id"),
        ):
            try:
                call()
            except (TypeError, InvalidTaskError, TaskResultDoesNotExist) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
            else:
                errors.append("no error")
        out(errors)
        """
    )
    assert got == [
        "TypeError: task 'shop.tasks.add': missing a required argument: 'b'",
        "TypeError: task 'shop.tasks.add': got an unexpected keyword argument 'c'",
        "SerializationError: task 'shop.tasks.add': args[1] is a date, which JSON cannot "
        "carry: Django tasks take and return str, int, float, bool, None, and lists and dicts "
        "of them (tuples are sent as lists, bytes as UTF-8 text)",
        "SerializationError: task 'shop.tasks.add': kwargs['b'][1] is nan: JSON has no NaN or "
        "infinity",
        "SerializationError: task 'shop.tasks.add': args[1] has a key that is not a string, 1: "
        "JSON object keys are strings, so the task would receive it as text",
        "SerializationError: task 'shop.tasks.add': args[1] is bytes that are not UTF-8 text",
        "InvalidTaskError: priority must be a whole number between -100 and 100.",
        "InvalidTaskError: Queue 'nowhere' is not valid for backend.",
        "TaskResultDoesNotExist: no-such-id",
    ]
    with App(sqlite_project.url) as observer:
        assert all_jobs(observer) == {}


@pytest.mark.timeout(60)
def test_a_waiting_job_reads_ready_and_a_cancelled_one_failed(
    sqlite_project: DjangoProject,
) -> None:
    got = sqlite_project.run(
        """
        run_after = timezone.now() + timedelta(hours=1)
        sent = note.using(run_after=run_after, priority=-20).enqueue("someday")
        waiting = note.get_result(sent.id)
        task_backends["default"].app.job(sent.id).cancel()
        cancelled = note.get_result(sent.id)
        try:
            add.get_result(sent.id)
        except Exception as exc:
            other_task = type(exc).__name__
        out({
            "waiting": [waiting.status, waiting.attempts, waiting.task.priority,
                        abs(waiting.task.run_after - run_after) < timedelta(milliseconds=1)],
            "cancelled": [cancelled.status, cancelled.is_finished,
                          cancelled.errors[0].exception_class.__qualname__],
            "other_task": other_task,
        })
        """
    )
    assert got["waiting"] == ["READY", 0, -20, True]
    assert got["cancelled"] == ["FAILED", True, "JobCancelledError"]
    assert got["other_task"] == "TaskResultMismatch"


@pytest.mark.timeout(60)
def test_a_worker_without_django_settings_says_what_to_set(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DJANGO_")}
    env["TASKMILL_URL"] = f"sqlite:///{tmp_path / 'jobs.db'}"
    proc = subprocess.run(
        [sys.executable, "-m", "taskmill", "worker", WORKER_APP],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode != 0
    assert "set DJANGO_SETTINGS_MODULE" in proc.stderr + proc.stdout
