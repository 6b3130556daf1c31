"""The app and its tasks on the memory broker: registration, sending, and the test helpers."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from taskmill import (
    App,
    Backoff,
    ConfigurationError,
    DuplicateJobError,
    Job,
    JobFailedError,
    JobNotFoundError,
    JobState,
    PayloadTooLargeError,
    SerializationError,
    UnknownTaskError,
    current_job,
)
from taskmill.context import JobContext
from taskmill.testing import running_worker, wait_until


@pytest.fixture
def app() -> Iterator[App]:
    app = App("memory://")
    yield app
    app.close()


def stored(app: App) -> list[Job]:
    """Every job the app's broker holds, newest first."""

    async def jobs() -> list[Job]:
        return await (await app.abroker()).list_jobs(limit=10_000)

    return app.run_sync(jobs())


def taskmill_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("taskmill")}


def started_since(before: set[threading.Thread]) -> list[str]:
    """Names of taskmill threads alive now that were not before (other tests' pool threads
    may still be winding down, so the comparison is by thread, not by count)."""
    return sorted(t.name for t in taskmill_threads() - before)


def module_level_task(x: int) -> int:
    return x


# --- the URL ---------------------------------------------------------------------------------


def test_url_comes_from_the_argument_then_taskmill_url_then_the_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TASKMILL_URL", "memory://?from=env")
    assert App().url == "memory://?from=env"
    assert App("memory://?from=arg").url == "memory://?from=arg"
    monkeypatch.delenv("TASKMILL_URL")
    assert App().url == "sqlite:///taskmill.db"


def test_no_io_when_the_app_is_made_or_tasks_are_declared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TASKMILL_URL", raising=False)
    threads = taskmill_threads()
    app = App()

    @app.task(queue="mail", retries=2)
    def send_mail(to: str) -> None: ...

    @app.task
    async def send_sms(to: str) -> None: ...

    assert app.broker is not None  # the broker object is made, still not connected
    app.close()  # closing an app that never opened does nothing
    assert list(tmp_path.iterdir()) == []
    assert started_since(threads) == []  # no loop thread, no worker


def test_the_default_database_is_taskmill_db_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TASKMILL_URL", raising=False)
    with App() as app:
        app.task(name="noop")(module_level_task).send(1)
    assert (tmp_path / "taskmill.db").is_file()


def test_importing_taskmill_does_no_io(tmp_path: Path) -> None:
    code = (
        "import threading, taskmill, taskmill.testing, taskmill.worker\n"
        "from taskmill import App\n"
        "app = App()\n"
        "@app.task\n"
        "def f(x: int) -> int:\n"
        "    return x\n"
        "assert threading.active_count() == 1, threading.enumerate()\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKMILL_")}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert list(tmp_path.iterdir()) == []


def test_two_apps_live_side_by_side() -> None:
    with App("memory://") as a, App("memory://") as b:
        ta = a.task(name="same.name")(module_level_task)
        tb = b.task(name="same.name")(lambda x: -x)
        ha, hb = ta.send(1), tb.send(2)
        assert a.run_until_idle() == 1
        assert b.run_until_idle() == 1
        assert (ha.result(timeout=5), hb.result(timeout=5)) == (1, -2)


def test_context_manager_closes_the_loop_thread() -> None:
    threads = taskmill_threads()
    with App("memory://") as app:
        app.task(name="t")(module_level_task).send(1)
        app.get_job(stored(app)[0].id)
    assert started_since(threads) == []


# --- registering tasks -------------------------------------------------------------------------


def test_default_name_is_module_and_qualname(app: App) -> None:
    def nested(x: int) -> int:
        return x

    t1 = app.task(module_level_task)
    t2 = app.task()(nested)
    assert t1.name == f"{__name__}.module_level_task"
    assert t2.name == f"{__name__}.test_default_name_is_module_and_qualname.nested"
    assert set(app.tasks) == {t1.name, t2.name}
    assert app.get_task(t1.name) is t1


def test_explicit_name(app: App) -> None:
    t = app.task(name="billing.charge")(module_level_task)
    assert t.name == "billing.charge"
    assert app.tasks == {"billing.charge": t}


def test_two_functions_with_one_name_are_an_error(app: App) -> None:
    app.task(name="report")(module_level_task)
    with pytest.raises(ConfigurationError, match=r"^two tasks are named 'report'; give one a"):
        app.task(name="report")(lambda x: x)

    made = []
    for i in range(2):

        def handler(x: int, i: int = i) -> int:
            return x + i

        made.append(handler)
    app.task(made[0])
    with pytest.raises(ConfigurationError, match=r"two tasks are named '.*\.handler'"):
        app.task(made[1])


def test_registering_the_same_function_again_is_harmless(app: App) -> None:
    first = app.task(name="t")(module_level_task)
    second = app.task(name="t")(module_level_task)
    assert app.tasks["t"] is second
    assert first.fn is second.fn


def test_unknown_task_lookup_lists_the_known_ones(app: App) -> None:
    app.task(name="a.one")(module_level_task)
    with pytest.raises(UnknownTaskError) as info:
        app.get_task("a.two")
    assert str(info.value) == "no task named 'a.two' is registered in this app (known: a.one)"


def test_task_options_and_defaults(app: App) -> None:
    t = app.task(
        name="t",
        queue="mail",
        priority=5,
        retries=4,
        backoff=30,
        timeout=timedelta(minutes=2),
        retry_on=ConnectionError,
        dont_retry_on=[ConnectionRefusedError],
    )(module_level_task)
    assert t.defaults.queue == "mail"
    assert t.defaults.priority == 5
    assert t.defaults.max_attempts == 5
    assert t.defaults.timeout_s == 120.0
    assert t.policy.backoff == Backoff.constant(30)
    assert t.policy.retry_on == (ConnectionError,)
    assert t.policy.dont_retry_on == (ConnectionRefusedError,)
    plain = app.task(name="plain")(module_level_task)
    assert plain.defaults.queue == "default"
    assert plain.defaults.max_attempts == 4
    assert plain.policy.backoff == Backoff()
    assert app.queues() == ["default", "mail"]
    assert App("memory://", default_queue="jobs").task(name="x")(len).defaults.queue == "jobs"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"retries": -1}, "retries must be >= 0, not -1"),
        ({"timeout": -5}, "timeout must be a non-negative number of seconds, not -5"),
        ({"timeout": float("nan")}, "timeout must be a non-negative number of seconds, not nan"),
        (
            {"timeout": 0},
            r"timeout must be more than 0 seconds, not 0 \(leave it out for no limit\)",
        ),
        (
            {"timeout": timedelta(0)},
            r"timeout must be more than 0 seconds, not datetime\.timedelta\(0\) \(leave it out "
            r"for no limit\)",
        ),
        (
            {"priority": "asap"},
            r"unknown priority 'asap': use a whole number from -1000 to 1000 "
            r"or one of urgent \(100\), high \(50\), normal \(0\), low \(-50\)",
        ),
    ],
)
def test_invalid_task_options(app: App, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=f"^{message}$"):
        app.task(name="t", **options)(module_level_task)
    assert app.tasks == {}


def test_calling_a_task_runs_it_here_and_stores_nothing(app: App) -> None:
    @app.task
    def add(a: int, b: int) -> int:
        return a + b

    @app.task
    async def aadd(a: int, b: int) -> int:
        return a + b

    assert add(1, 2) == 3
    assert asyncio.run(aadd(1, 2)) == 3
    assert (add.is_async, aadd.is_async) == (False, True)
    assert add.__doc__ is None and add.__wrapped__ is add.fn
    assert stored(app) == []


# --- sending -------------------------------------------------------------------------------------


def test_send_stores_a_queued_job_with_the_tasks_defaults(app: App) -> None:
    t = app.task(name="t", queue="q", priority=3, retries=1, timeout=9)(module_level_task)
    handle = t.send(7)
    job = app.get_job(handle.id)
    assert (job.task, job.queue, job.state, job.priority) == ("t", "q", JobState.QUEUED, 3)
    assert (job.attempt, job.max_attempts, job.timeout_s) == (0, 2, 9.0)
    assert job.payload == b"[[7],{}]"
    assert handle.existing is False


@pytest.mark.parametrize(
    ("args", "kwargs", "reason"),
    [
        ((1,), {}, "missing a required argument: 'b'"),
        ((1, 2, 3), {}, "too many positional arguments"),
        ((1,), {"c": 2}, "missing a required argument: 'b'"),
        ((1, 2), {"c": 3}, "got an unexpected keyword argument 'c'"),
        ((1,), {"a": 2}, "multiple values for argument 'a'"),
    ],
)
def test_a_call_that_does_not_fit_the_signature_fails_in_the_producer(
    app: App, args: tuple[Any, ...], kwargs: dict[str, Any], reason: str
) -> None:
    @app.task(name="math.add")
    def add(a: int, b: int) -> int:
        return a + b

    with pytest.raises(TypeError) as info:
        add.send(*args, **kwargs)
    assert str(info.value) == f"task 'math.add': {reason}"
    with pytest.raises(TypeError, match=r"^task 'math\.add': "):
        add.options(queue="other").send(*args, **kwargs)
    assert stored(app) == []


async def test_asend_binds_arguments_too(app: App) -> None:
    @app.task(name="math.add")
    def add(a: int, b: int) -> int:
        return a + b

    with pytest.raises(TypeError, match=r"^task 'math\.add': missing a required argument: 'b'$"):
        await add.asend(1)  # type: ignore[call-arg]
    handle = await add.asend(1, b=2)
    assert (await handle.ainfo()).payload == b'[[1],{"b":2}]'


def test_flexible_signatures_bind_as_python_would(app: App) -> None:
    @app.task(name="flex")
    def flex(a: int, /, *rest: int, flag: bool = False, **extra: str) -> int:
        return a

    flex.send(1)
    flex.send(1, 2, 3, flag=True, colour="red")
    with pytest.raises(TypeError, match=r"^task 'flex': .*'a'"):
        flex.send(a=1)  # type: ignore[call-arg, arg-type]
    assert len(stored(app)) == 2


def test_a_non_serialisable_argument_fails_in_the_producer(app: App) -> None:
    t = app.task(name="t")(module_level_task)
    with pytest.raises(SerializationError, match=r"^arguments of task 't' cannot be stored"):
        t.send(object())  # type: ignore[arg-type]
    assert stored(app) == []


def test_the_payload_limit_is_an_app_setting() -> None:
    with App("memory://", max_payload_bytes=100) as app:
        t = app.task(name="t")(len)
        t.send("x" * 80)
        with pytest.raises(PayloadTooLargeError, match=r"the limit is 100 "):
            t.send("x" * 100)
        assert len(stored(app)) == 1


def test_send_many_takes_tuples_lists_and_mappings(app: App) -> None:
    @app.task(name="add")
    def add(a: int, b: int = 0) -> int:
        return a + b

    handles = add.send_many([(1, 2), [3], {"a": 4, "b": 5}])
    handles += add.send_many((i, i) for i in range(1))  # any iterable of calls
    assert len(handles) == 4
    assert add.send_many([]) == []
    assert add.send_many(iter([(1,)]))[0].id
    assert app.run_until_idle() == 5
    assert [h.result(timeout=5) for h in handles] == [3, 3, 9, 0]


@pytest.mark.parametrize(
    ("item", "type_name"),
    [(1, "int"), ("ab", "str"), (b"ab", "bytes"), (None, "NoneType"), ({1, 2}, "set")],
)
def test_send_many_rejects_items_that_are_not_argument_tuples_or_mappings(
    app: App, item: object, type_name: str
) -> None:
    add = app.task(name="add")(module_level_task)
    with pytest.raises(TypeError) as info:
        add.send_many([(1,), item])  # type: ignore[list-item]
    assert str(info.value) == (
        "send_many of task 'add' takes tuples of positional arguments or mappings of keyword "
        f"arguments, not {type_name}"
    )
    assert stored(app) == []


def test_send_many_is_all_or_nothing_when_one_call_does_not_bind(app: App) -> None:
    add = app.task(name="add")(module_level_task)
    with pytest.raises(TypeError, match=r"^task 'add': too many positional arguments$"):
        add.send_many([(1,), (2,), (3, 4)])
    with pytest.raises(SerializationError):
        add.send_many([(1,), (object(),)])
    assert stored(app) == []


def test_options_change_one_send_and_leave_the_task_alone(app: App) -> None:
    t = app.task(name="t", queue="default", priority=0)(module_level_task)
    run_at = datetime(2999, 1, 1, tzinfo=UTC)
    a = t.options(queue="urgent", priority=9, retries=0, timeout=1.5).send(1)
    b = t.options(delay=timedelta(hours=1)).send(2)
    c = t.options(run_at=run_at).send(3)
    d = t.options(run_at=run_at.timestamp() + 1).send(4)
    e = t.send(5)
    ja, jb, jc, jd, je = (app.get_job(h.id) for h in (a, b, c, d, e))
    assert (ja.queue, ja.priority, ja.max_attempts, ja.timeout_s) == ("urgent", 9, 1, 1.5)
    assert jb.state is JobState.SCHEDULED
    assert 3599 <= jb.run_at - jb.enqueued_at <= 3601
    assert (jc.state, jc.run_at) == (JobState.SCHEDULED, run_at.timestamp())
    assert jd.run_at == run_at.timestamp() + 1
    assert (je.queue, je.priority, je.max_attempts, je.state) == ("default", 0, 4, JobState.QUEUED)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"on_conflict": "ignore"}, "on_conflict must be 'return' or 'raise'"),
        ({"retries": -2}, "retries must be >= 0, not -2"),
        ({"delay": -1}, "delay must be a non-negative number of seconds, not -1"),
        ({"delay": float("nan")}, "delay must be a non-negative number of seconds, not nan"),
        (
            {"delay": timedelta(seconds=-3)},
            r"delay must be a non-negative number of seconds, not datetime\.timedelta",
        ),
        ({"timeout": -0.5}, "timeout must be a non-negative number of seconds, not -0.5"),
        ({"timeout": 0}, r"timeout must be more than 0 seconds, not 0 \(leave it out"),
        ({"timeout": 0.0}, r"timeout must be more than 0 seconds, not 0\.0 \(leave it out"),
        ({"priority": "URGENT"}, r"unknown priority 'URGENT': use a whole number"),
        ({"priority": 1.5}, r"priority must be a whole number or a name, not 1\.5"),
    ],
)
def test_invalid_send_options(app: App, options: dict[str, Any], message: str) -> None:
    t = app.task(name="t")(module_level_task)
    with pytest.raises(ConfigurationError, match=f"^{message}"):
        t.options(**options)


def test_key_may_be_a_function_of_the_arguments(app: App) -> None:
    @app.task(name="welcome", key=lambda user_id, lang="en": f"welcome-{user_id}-{lang}")
    def welcome(user_id: int, lang: str = "en") -> str:
        return f"hi {user_id}"

    first = welcome.send(1)
    again = welcome.send(user_id=1)
    other = welcome.send(1, "fr")
    assert app.get_job(first.id).key == "welcome-1-en"
    assert (again.id, again.existing) == (first.id, True)
    assert other.id != first.id and not other.existing
    with pytest.raises(DuplicateJobError) as info:
        welcome.options(on_conflict="raise").send(1)
    assert info.value.existing_id == first.id
    assert str(info.value) == f"a job with key 'welcome-1-en' is already pending: {first.id}"
    assert len(stored(app)) == 2
    app.run_until_idle()
    assert not welcome.send(1).existing  # the key is free once the job finished


def test_a_key_option_overrides_the_tasks_key(app: App) -> None:
    t = app.task(name="t", key=lambda x: f"by-arg-{x}")(module_level_task)
    a = t.options(key="fixed").send(1)
    b = t.options(key="fixed").send(2)
    assert b.id == a.id and b.existing
    assert app.get_job(a.id).key == "fixed"


def test_send_many_with_keys_returns_existing_jobs_for_duplicates(app: App) -> None:
    t = app.task(name="t", key=lambda x: f"k{x}")(module_level_task)
    handles = t.send_many([(1,), (2,), (1,)])
    assert handles[2].id == handles[0].id and handles[2].existing
    assert len(stored(app)) == 2


def test_the_memory_broker_has_no_transactional_enqueue(app: App) -> None:
    t = app.task(name="t")(module_level_task)
    with pytest.raises(TypeError, match=r"the memory broker has no transactions"):
        t.options(connection=object()).send(1)
    assert stored(app) == []


async def test_asend_refuses_a_connection(app: App) -> None:
    t = app.task(name="t")(module_level_task)
    with pytest.raises(ConfigurationError, match=r"connection= is for send\(\)"):
        await t.options(connection=object()).asend(1)


def test_named_priorities_everywhere_a_priority_is_taken(app: App) -> None:
    t = app.task(name="t", priority="high")(module_level_task)
    assert t.defaults.priority == 50
    sent = {
        name: t.options(priority=name).send(1).id for name in ("urgent", "high", "normal", "low")
    }
    by_task = app.send_task("t", [1], priority="low")
    assert {n: app.get_job(i).priority for n, i in sent.items()} == {
        "urgent": 100,
        "high": 50,
        "normal": 0,
        "low": -50,
    }
    assert app.get_job(by_task.id).priority == -50
    assert app.get_job(t.send(1).id).priority == 50  # the task's default


def test_send_task_by_name_checks_registered_tasks(app: App) -> None:
    app.task(name="add")(lambda a, b: a + b)
    with pytest.raises(TypeError, match=r"^task 'add': missing a required argument: 'b'$"):
        app.send_task("add", [1])
    handle = app.send_task("add", [1], {"b": 2}, priority=4)
    assert app.get_job(handle.id).priority == 4
    app.run_until_idle()
    assert handle.result(timeout=5) == 3


def test_send_task_with_a_name_the_app_does_not_have_fails_at_once(app: App) -> None:
    app.task(name="add")(lambda a, b: a + b)
    with pytest.raises(UnknownTaskError) as info:
        app.send_task("ad", [1, 2])
    assert str(info.value) == "no task named 'ad' is registered in this app (known: add)"
    assert stored(app) == []


def test_send_task_external_sends_a_task_defined_elsewhere(app: App) -> None:
    app.task(name="add")(lambda a, b: a + b)
    elsewhere = app.send_task("billing.charge", [1, 2, 3], external=True, queue="billing")
    job = app.get_job(elsewhere.id)
    assert (job.task, job.queue, job.state) == ("billing.charge", "billing", JobState.QUEUED)


def test_an_app_without_tasks_sends_any_name_and_the_worker_checks_it() -> None:
    with App("memory://") as producer:  # a URL-only producer (the CLI with --url)
        unknown = producer.send_task("elsewhere.task", [1, 2, 3])
        assert producer.get_job(unknown.id).queue == "default"
        producer.run_until_idle()
        with pytest.raises(JobFailedError) as info:
            unknown.result(timeout=5)
    assert info.value.type == "taskmill.errors.UnknownTaskError"
    assert "no task named 'elsewhere.task'" in info.value.message


# --- handles ------------------------------------------------------------------------------------


def test_handle_of_an_unknown_job(app: App) -> None:
    with pytest.raises(JobNotFoundError, match=r"^job nope does not exist \(or was pruned\)$"):
        app.get_job("nope")
    with pytest.raises(JobNotFoundError):
        app.job("nope").status()


def test_waiting_for_a_result_times_out_with_the_state(app: App) -> None:
    handle = app.task(name="t")(module_level_task).send(1)
    with pytest.raises(TimeoutError, match=r"^job .* \(t\) is still queued after 0\.05 s"):
        handle.result(timeout=0.05)


def test_a_timed_out_wait_says_when_no_worker_consumes_the_queue(app: App) -> None:
    t = app.task(name="t", queue="mail")(module_level_task)
    handle = t.send(1)
    with pytest.raises(TimeoutError) as info:
        handle.result(timeout=0.05)
    assert str(info.value).endswith(
        "is still queued after 0.05 s; no worker is consuming queue 'mail'"
    )
    # a registered worker on another queue does not count; one on the job's queue does (the
    # worker here is paused: it takes nothing, so the wait still times out)
    with running_worker(app, queues=["default"]) as other:
        wait_until(lambda: is_registered(app, other.id), what=f"worker {other.id} to register")
        with pytest.raises(TimeoutError, match=r"no worker is consuming queue 'mail'$"):
            handle.result(timeout=0.05)
    app.run_sync(app.broker.pause("mail", True))
    with running_worker(app, queues=["mail"]) as worker:
        wait_until(lambda: is_registered(app, worker.id), what=f"worker {worker.id} to register")
        with pytest.raises(TimeoutError) as info:
            handle.result(timeout=0.05)
    assert str(info.value).endswith("is still queued after 0.05 s")


def is_registered(app: App, worker_id: str) -> bool:
    return any(w.id == worker_id for w in app.run_sync(app.broker.list_workers()))


def test_a_failed_job_raises_the_remote_type_message_and_traceback(app: App) -> None:
    @app.task(name="boom", retries=0)
    def boom(n: int) -> None:
        raise LookupError(f"no row {n}")

    handle = boom.send(3)
    app.run_until_idle()
    with pytest.raises(JobFailedError) as info:
        handle.result(timeout=5)
    err = info.value
    assert (err.job_id, err.type, err.message) == (handle.id, "LookupError", "no row 3")
    assert str(err) == f"job {handle.id} failed: LookupError: no row 3"
    assert 'raise LookupError(f"no row {n}")' in err.traceback
    assert "in boom" in err.traceback


# --- eager mode and run_until_idle -------------------------------------------------------------


@pytest.mark.parametrize("flag", ["1", "true", "yes", "TRUE"])
def test_eager_mode_runs_the_job_before_send_returns(flag: str) -> None:
    with App(f"memory://?eager={flag}") as app:
        assert app.eager
        calls: list[int] = []

        @app.task(name="record")
        def record(x: int) -> int:
            calls.append(x)
            return x * 2

        handle = record.send(21)
        assert calls == [21]
        assert handle.status() is JobState.SUCCEEDED
        assert handle.result(timeout=0) == 42
        handles = record.send_many([(1,), (2,)])
        assert calls == [21, 1, 2]
        assert [h.status() for h in handles] == [JobState.SUCCEEDED] * 2


def test_eager_mode_reports_failures_through_the_handle() -> None:
    with App("memory://?eager=1") as app:

        @app.task(name="boom", retries=0)
        def boom() -> None:
            raise ValueError("nope")

        handle = boom.send()
        assert handle.status() is JobState.FAILED
        with pytest.raises(JobFailedError, match=r"ValueError: nope"):
            handle.result(timeout=0)


async def test_eager_mode_from_async_code() -> None:
    async with App("memory://?eager=1") as app:

        @app.task(name="double")
        async def double(x: int) -> int:
            await asyncio.sleep(0)
            return 2 * x

        handle = await double.asend(4)
        assert await handle.astatus() is JobState.SUCCEEDED
        assert await handle.aresult(timeout=0) == 8


@pytest.mark.parametrize("url", ["memory://", "memory://?eager=0", "memory://?eager=no"])
def test_eager_mode_is_off_unless_asked(url: str) -> None:
    with App(url) as app:
        assert not app.eager
        handle = app.task(name="t")(module_level_task).send(1)
        assert handle.status() is JobState.QUEUED


def test_run_until_idle_runs_everything_due_and_says_how_many_ran(app: App) -> None:
    seen: list[str] = []

    @app.task(name="a", queue="qa")
    def a(x: int) -> int:
        seen.append(f"a{x}")
        return x

    @app.task(name="b", queue="qb")
    async def b(x: int) -> int:
        seen.append(f"b{x}")
        return x

    handles = [a.send(1), b.send(2), a.send(3)]
    later = a.options(delay=3600).send(4)
    assert app.run_until_idle() == 3
    assert sorted(seen) == ["a1", "a3", "b2"]
    assert [h.status() for h in handles] == [JobState.SUCCEEDED] * 3
    assert later.status() is JobState.SCHEDULED
    assert app.run_until_idle() == 0


def test_run_until_idle_can_be_limited_to_some_queues(app: App) -> None:
    a = app.task(name="a", queue="qa")(module_level_task)
    b = app.task(name="b", queue="qb")(module_level_task)
    ha, hb = a.send(1), b.send(2)
    assert app.run_until_idle(queues=["qb"]) == 1
    assert (ha.status(), hb.status()) == (JobState.QUEUED, JobState.SUCCEEDED)


def test_run_until_idle_includes_immediate_retries(app: App) -> None:
    @app.task(name="flaky", retries=3, backoff=0)
    def flaky() -> int:
        if current_job().attempt < 3:
            raise ConnectionError("try again")
        return current_job().attempt

    handle = flaky.send()
    assert app.run_until_idle() == 3
    assert handle.result(timeout=0) == 3


async def test_run_until_idle_works_from_inside_an_event_loop(app: App) -> None:
    t = app.task(name="t")(module_level_task)
    handle = await t.asend(5)
    assert app.run_until_idle() == 1  # on a helper thread: this loop is busy
    assert await app.arun_until_idle() == 0
    assert await handle.aresult(timeout=1) == 5


# --- running_worker and the pytest fixture -------------------------------------------------


def test_running_worker_runs_jobs_on_a_background_thread_and_stops(app: App) -> None:
    done = threading.Event()

    @app.task(name="signal")
    def signal(x: int) -> str:
        done.set()
        return threading.current_thread().name

    with running_worker(app, concurrency=2) as worker:
        handle = signal.send(1)
        assert handle.result(timeout=10).startswith("taskmill-task")
        assert done.is_set()
        assert worker.concurrency == 2
    assert "taskmill-test-worker" not in {t.name for t in taskmill_threads()}
    assert worker.jobs_done == 1


def test_running_worker_rejects_bad_options_at_once(app: App) -> None:
    with (
        pytest.raises(ValueError, match=r"pool='process' needs app_path"),
        running_worker(app, pool="process"),
    ):
        pass
    assert "taskmill-test-worker" not in {t.name for t in taskmill_threads()}


production = App("sqlite:///never-created.db")


@production.task(name="double")
def double(x: int) -> int:
    return 2 * x


def test_the_taskmill_memory_fixture_swaps_in_a_memory_broker(
    taskmill_memory: Callable[[App], App], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert taskmill_memory(production) is production
    assert production.url == "memory://"
    handle = double.send(21)
    assert production.run_until_idle() == 1
    assert handle.result(timeout=5) == 42
    assert list(tmp_path.iterdir()) == []


def test_the_taskmill_memory_fixture_is_a_registered_plugin_and_restores_the_app(
    tmp_path: Path,
) -> None:
    """In a fresh pytest run with no conftest: the plugin comes from the entry point."""
    (tmp_path / "test_user_code.py").write_text(
        "from taskmill import App\n"
        "app = App('sqlite:///prod.db')\n"
        "@app.task(name='double')\n"
        "def double(x: int) -> int:\n"
        "    return 2 * x\n"
        "def test_uses_memory(taskmill_memory):\n"
        "    taskmill_memory(app)\n"
        "    handle = double.send(21)\n"
        "    assert app.run_until_idle() == 1\n"
        "    assert handle.result(timeout=5) == 42\n"
        "def test_restored_afterwards():\n"
        "    assert app.url == 'sqlite:///prod.db'\n"
        "    assert app.client._broker is None\n",
        "utf-8",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TASKMILL_", "PYTEST_"))}
    command = [sys.executable, "-m", "pytest", "-q", "-W", "error", "-p", "no:cacheprovider"]
    proc = subprocess.run(
        [*command, "-p", "no:asyncio"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 passed" in proc.stdout
    assert not (tmp_path / "prod.db").exists()


# --- inside a job ------------------------------------------------------------------------------


def test_current_job_outside_a_job_is_an_error() -> None:
    with pytest.raises(
        RuntimeError, match=r"^current_job\(\) was called outside a running taskmill job$"
    ):
        current_job()


def test_current_job_describes_the_running_job(app: App) -> None:
    @app.task(name="introspect", queue="q", retries=1)
    def introspect() -> list[Any]:
        job = current_job()
        return [job.id, job.task, job.queue, job.attempt, job.max_attempts, job.cancelled]

    handle = introspect.send()
    app.run_until_idle()
    assert handle.result(timeout=0) == [handle.id, "introspect", "q", 1, 2, False]
    with pytest.raises(RuntimeError):
        current_job()  # the worker did not leak the job into this thread's context


def make_context(reports: list[tuple[str, float | None, str | None]]) -> JobContext:
    return JobContext(
        id="j1",
        task="t",
        queue="q",
        attempt=1,
        max_attempts=1,
        _report=lambda i, f, m: reports.append((i, f, m)),
    )


def test_progress_accepts_fractions_from_zero_to_one_and_messages() -> None:
    reports: list[tuple[str, float | None, str | None]] = []
    ctx = make_context(reports)
    ctx.progress(0)
    ctx.progress(0.5, "halfway")
    ctx.progress(1.0)
    ctx.progress(message="just a message")
    assert reports == [
        ("j1", 0, None),
        ("j1", 0.5, "halfway"),
        ("j1", 1.0, None),
        ("j1", None, "just a message"),
    ]


@pytest.mark.parametrize("fraction", [-0.01, 1.01, 50, float("nan"), float("inf")])
def test_progress_rejects_fractions_outside_zero_to_one(fraction: float) -> None:
    reports: list[tuple[str, float | None, str | None]] = []
    with pytest.raises(ValueError, match=r"^progress fraction must be between 0 and 1, not "):
        make_context(reports).progress(fraction)
    assert reports == []


def test_a_bad_progress_fraction_inside_a_task_fails_the_attempt(app: App) -> None:
    @app.task(name="p", retries=0)
    def p() -> None:
        current_job().progress(42)

    handle = p.send()
    app.run_until_idle()
    with pytest.raises(JobFailedError, match=r"ValueError: progress fraction must be between"):
        handle.result(timeout=0)
