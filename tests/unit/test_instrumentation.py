"""Instrumentation (``taskmill.hooks.Instrumentation``): context managers around every send
and every run, on the memory broker. What ``sending`` adds to a job's metadata is stored and
read back by ``running``; ``running`` is entered where the function runs, sees its error, and
what it makes current the function sees; a bad instrumentation is a precise error."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import msgspec
import pytest

from taskmill import App, ConfigurationError, current_job, group
from taskmill.job import Job, NewJob
from taskmill.testing import running_worker

stamp: contextvars.ContextVar[str] = contextvars.ContextVar("stamp", default="none")


class Stamp:
    """Adds ``{key: "<label>:<job id>"}`` to each job sent; makes it current while the job
    runs; writes down what it saw."""

    def __init__(self, label: str = "s", key: str = "stamp") -> None:
        self.label, self.key = label, key
        self.sent: list[tuple[str, ...]] = []
        self.ran: list[tuple[str, str | None]] = []  # (job id, the error's type, if any)

    @contextlib.contextmanager
    def sending(self, jobs: Sequence[NewJob]) -> Iterator[Sequence[NewJob]]:
        self.sent.append(tuple(j.id for j in jobs))
        try:
            yield [
                msgspec.structs.replace(j, meta={**j.meta, self.key: f"{self.label}:{j.id}"})
                for j in jobs
            ]
        except Exception as exc:
            self.sent.append(("raised", type(exc).__name__))
            raise

    @contextlib.contextmanager
    def running(self, job: Job) -> Iterator[None]:
        token = stamp.set(str(job.meta.get(self.key)))
        try:
            yield
        except BaseException as exc:
            self.ran.append((job.id, type(exc).__name__))
            raise
        else:
            self.ran.append((job.id, None))
        finally:
            stamp.reset(token)


@pytest.fixture
def app() -> Iterator[App]:
    app = App("memory://")
    yield app
    app.close()


@pytest.mark.timeout(30)
def test_what_sending_adds_is_stored_and_running_makes_it_current(app: App) -> None:
    stamper = Stamp()
    app.add_instrumentation(stamper)

    @app.task()
    def sync_seen() -> str:
        return stamp.get()

    @app.task()
    async def async_seen() -> str:
        return stamp.get()

    s = sync_seen.options(meta={"user": 1}).send()
    a = async_seen.send()
    assert app.get_job(s.id).meta == {"user": 1, "stamp": f"s:{s.id}"}
    assert app.run_until_idle() == 2
    assert s.result(timeout=5) == f"s:{s.id}"
    assert a.result(timeout=5) == f"s:{a.id}"
    assert stamper.sent == [(s.id,), (a.id,)]
    assert sorted(stamper.ran) == sorted([(s.id, None), (a.id, None)])
    assert stamp.get() == "none"  # nothing leaks out of the run


@pytest.mark.timeout(30)
@pytest.mark.parametrize("pool", ["thread", "async"])
def test_a_sync_function_sees_the_context_in_every_in_process_pool(app: App, pool: str) -> None:
    app.add_instrumentation(Stamp())

    @app.task()
    def seen() -> str:
        return stamp.get()

    with running_worker(app, pool=pool):
        handle = seen.send()
        assert handle.result(timeout=10) == f"s:{handle.id}"


@pytest.mark.timeout(30)
def test_running_sees_the_functions_error_and_the_retry_runs_inside_it_again(app: App) -> None:
    stamper = Stamp()
    app.add_instrumentation(stamper)

    @app.task(retries=1, backoff=0)
    def flaky() -> int:
        if current_job().attempt == 1:
            raise ValueError("first try")
        return 2

    handle = flaky.send()
    app.run_until_idle()
    assert handle.result(timeout=5) == 2
    assert stamper.ran == [(handle.id, "ValueError"), (handle.id, None)]
    assert stamper.sent == [(handle.id,)]  # a retry is not a send


@pytest.mark.timeout(30)
async def test_asend_send_many_and_a_workflow_go_through_sending(app: App) -> None:
    stamper = Stamp()
    app.add_instrumentation(stamper)

    @app.task()
    def one(n: int) -> int:
        return n

    h = await one.asend(1)
    many = await one.asend_many([(2,), (3,)])
    g = await group([one.s(4), one.s(5)]).asend(app)
    assert stamper.sent[0] == (h.id,)
    assert stamper.sent[1] == tuple(x.id for x in many)
    assert len(stamper.sent) == 3  # the group's steps: one write
    await app.arun_until_idle()
    assert await g.aresult(timeout=5) == [4, 5]
    for job_ids in stamper.sent:
        for job_id in job_ids:
            assert (await app.aget_job(job_id)).meta == {"stamp": f"s:{job_id}"}


@pytest.mark.timeout(30)
def test_instrumentations_nest_in_the_order_they_were_added(app: App) -> None:
    first, second = Stamp("a", "first"), Stamp("b", "second")
    app.add_instrumentation(first)
    app.add_instrumentation(second)
    app.add_instrumentation(first)  # once only

    @app.task()
    def seen() -> str:
        return stamp.get()

    handle = seen.send()
    assert app.get_job(handle.id).meta == {"first": f"a:{handle.id}", "second": f"b:{handle.id}"}
    app.run_until_idle()
    assert handle.result(timeout=5) == f"b:{handle.id}"  # the inner one set it last
    app.remove_instrumentation(second)
    app.remove_instrumentation(second)  # no error
    assert app.registry.instrumentations == [first]


@pytest.mark.timeout(30)
def test_a_failed_write_passes_through_sending(app: App) -> None:
    from taskmill.errors import DuplicateJobError

    stamper = Stamp()
    app.add_instrumentation(stamper)

    @app.task()
    def once() -> None: ...

    once.options(key="k").send()
    with pytest.raises(DuplicateJobError):
        once.options(key="k", on_conflict="raise").send()
    assert stamper.sent[-1] == ("raised", "DuplicateJobError")


class BadMeta:
    @contextlib.contextmanager
    def sending(self, jobs: Sequence[NewJob]) -> Iterator[Sequence[NewJob]]:
        yield [msgspec.structs.replace(j, meta={"has space": "x"}) for j in jobs]

    def running(self, job: Job) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()

    def __repr__(self) -> str:
        return "<BadMeta>"


class DropsJobs(BadMeta):
    @contextlib.contextmanager
    def sending(self, jobs: Sequence[NewJob]) -> Iterator[Sequence[NewJob]]:
        yield jobs[1:]

    def __repr__(self) -> str:
        return "<DropsJobs>"


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("instrumentation", "message"),
    [
        (BadMeta(), r"meta of job \S+ as <BadMeta> left it key 'has space' is not"),
        (DropsJobs(), r"instrumentation <DropsJobs> changed which jobs are sent"),
    ],
)
def test_a_bad_instrumentation_is_a_precise_error_and_stores_nothing(
    app: App, instrumentation: BadMeta, message: str
) -> None:
    app.add_instrumentation(instrumentation)

    @app.task()
    def noop() -> None: ...

    with pytest.raises(ConfigurationError, match=message):
        noop.send_many([(), ()])
    assert app.list_jobs().jobs == []


class CarriedStamp(Stamp):
    """A ``CarriedInstrumentation``: the stamp current in the worker goes to a child."""

    def carry(self) -> dict[str, str | int | float | bool | None]:
        return {self.key: stamp.get()}

    @contextlib.contextmanager
    def carried(self, meta: dict[str, str | int | float | bool | None]) -> Iterator[None]:
        token = stamp.set(f"child got {meta[self.key]}")
        try:
            yield
        finally:
            stamp.reset(token)


@pytest.mark.timeout(30)
def test_what_a_carried_instrumentation_carries_is_current_around_a_childs_call() -> None:
    from taskmill.hooks import CarriedInstrumentation, carried_context, carry

    plain, carried = Stamp("p", "plain"), CarriedStamp("c", "carried")
    assert not isinstance(plain, CarriedInstrumentation)
    assert isinstance(carried, CarriedInstrumentation)
    token = stamp.set("the worker's span")
    try:
        meta = carry([plain, carried])  # the plain one carries nothing
    finally:
        stamp.reset(token)
    assert meta == {"carried": "the worker's span"}
    with carried_context([plain, carried], meta):
        assert stamp.get() == "child got the worker's span"
    assert stamp.get() == "none"
