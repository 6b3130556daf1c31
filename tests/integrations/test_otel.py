"""OpenTelemetry tracing (``taskmill.integrations.otel``), read back with the SDK's in-memory
exporter: the producer and consumer spans, their attributes and links, spans a task makes,
errors and retries, a send from inside a job, every pool, and a real ``taskmill worker``
process whose spans join the producer's trace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from taskmill import App, JobState
from taskmill.errors import DuplicateJobError
from taskmill.integrations.otel import TaskmillInstrumentation, instrument, uninstrument
from taskmill.testing import running_worker, wait_until

ROOT = Path(__file__).resolve().parents[2]


class Traced:
    """An app on the memory broker, traced into an in-memory exporter."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("tests")
        self.app = App("memory://")
        self.instrumentation = instrument(self.app, tracer_provider=self.provider)

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        spans = self.exporter.get_finished_spans()
        return [s for s in spans if name is None or s.name == name]

    def one(self, name: str) -> ReadableSpan:
        found = self.spans(name)
        assert len(found) == 1, [s.name for s in self.spans()]
        return found[0]


@pytest.fixture
def traced() -> Iterator[Traced]:
    t = Traced()
    yield t
    uninstrument(t.app)
    t.app.close()
    t.provider.shutdown()


def parent_id(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.span_id)


def trace_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.trace_id)


def traceparent(span: ReadableSpan) -> str:
    assert span.context is not None
    c = span.context
    return f"00-{c.trace_id:032x}-{c.span_id:016x}-{c.trace_flags:02x}"


@pytest.mark.timeout(20)
def test_a_send_and_its_run_are_a_producer_and_a_consumer_span_of_one_trace(
    traced: Traced,
) -> None:
    @traced.app.task(name="mail.welcome", queue="mail")
    def welcome(user_id: int) -> str:
        return f"welcome {user_id}"

    handle = welcome.options(meta={"user_id": 7}).send(7)
    assert traced.app.run_until_idle() == 1

    send = traced.one("send mail")
    assert send.kind is SpanKind.PRODUCER
    assert dict(send.attributes or {}) == {
        "messaging.system": "taskmill",
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.destination.name": "mail",
        "messaging.message.id": handle.id,
        "taskmill.task": "mail.welcome",
    }
    # the trace context is stored with the job, beside the metadata the send gave
    assert traced.app.get_job(handle.id).meta == {"user_id": 7, "traceparent": traceparent(send)}

    process = traced.one("process mail")
    assert process.kind is SpanKind.CONSUMER
    assert dict(process.attributes or {}) == {
        "messaging.system": "taskmill",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": "mail",
        "messaging.message.id": handle.id,
        "taskmill.task": "mail.welcome",
        "taskmill.attempt": 1,
        "taskmill.max_attempts": 4,
    }
    assert trace_id(process) == trace_id(send)
    assert parent_id(process) == span_id(send)
    assert [link.context.span_id for link in process.links] == [span_id(send)]
    assert process.status.status_code is StatusCode.UNSET


@pytest.mark.timeout(20)
def test_a_send_inside_a_span_of_the_caller_is_its_child(traced: Traced) -> None:
    @traced.app.task()
    def noop() -> None: ...

    with traced.tracer.start_as_current_span("POST /signup") as request:
        noop.send()
    traced.app.run_until_idle()
    send = traced.one("send default")
    assert parent_id(send) == request.get_span_context().span_id
    assert trace_id(traced.one("process default")) == request.get_span_context().trace_id


@pytest.mark.timeout(20)
@pytest.mark.parametrize("pool", ["thread", "async"])
def test_spans_a_task_makes_are_children_of_its_consumer_span(traced: Traced, pool: str) -> None:
    tracer = traced.tracer

    @traced.app.task()
    def resize(path: str) -> str:
        with tracer.start_as_current_span("resize in a thread"):
            return path

    @traced.app.task()
    async def upload(path: str) -> str:
        with tracer.start_as_current_span("upload on the loop"):
            return path

    with running_worker(traced.app, pool=pool):
        assert resize.send("a.png").result(timeout=10) == "a.png"
        assert upload.send("b.png").result(timeout=10) == "b.png"

    processes = {s.attributes["taskmill.task"]: s for s in traced.spans("process default")}  # type: ignore[index]
    inner = traced.one("resize in a thread")
    assert parent_id(inner) == span_id(processes[resize.name])
    assert trace_id(inner) == trace_id(processes[resize.name])
    inner = traced.one("upload on the loop")
    assert parent_id(inner) == span_id(processes[upload.name])


@pytest.mark.timeout(20)
def test_an_error_is_recorded_and_its_retry_is_a_second_consumer_span(traced: Traced) -> None:
    @traced.app.task(retries=1, backoff=0)
    def flaky() -> str:
        from taskmill import current_job

        if current_job().attempt == 1:
            raise ConnectionError("upstream said 503")
        return "ok"

    handle = flaky.send()
    traced.app.run_until_idle()
    assert handle.result(timeout=5) == "ok"

    send = traced.one("send default")
    first, second = sorted(traced.spans("process default"), key=lambda s: s.start_time or 0)
    assert (first.attributes or {})["taskmill.attempt"] == 1
    assert (second.attributes or {})["taskmill.attempt"] == 2
    # both attempts hang off the one send
    assert parent_id(first) == parent_id(second) == span_id(send)

    assert first.status.status_code is StatusCode.ERROR
    assert first.status.description == "ConnectionError: upstream said 503"
    assert (first.attributes or {})["error.type"] == "ConnectionError"
    (event,) = first.events
    assert event.name == "exception"
    assert dict(event.attributes or {})["exception.type"] == "ConnectionError"
    assert dict(event.attributes or {})["exception.message"] == "upstream said 503"

    assert second.status.status_code is StatusCode.UNSET
    assert "error.type" not in (second.attributes or {})


@pytest.mark.timeout(20)
def test_a_time_limit_is_recorded_on_the_consumer_span(traced: Traced) -> None:
    import asyncio

    @traced.app.task(retries=0, timeout=0.05)
    async def stuck() -> None:
        await asyncio.sleep(30)

    handle = stuck.send()
    traced.app.run_until_idle()
    assert handle.status() is JobState.FAILED
    process = traced.one("process default")
    assert process.status.status_code is StatusCode.ERROR
    assert (process.attributes or {})["error.type"] == "taskmill.errors.TaskTimeoutError"


@pytest.mark.timeout(20)
def test_a_send_from_inside_a_job_continues_its_trace(traced: Traced) -> None:
    @traced.app.task(name="notify")
    def notify(order_id: int) -> None: ...

    @traced.app.task(name="checkout")
    async def checkout(order_id: int) -> None:
        await notify.asend(order_id)

    checkout.send(1)
    traced.app.run_until_idle()

    sends = {s.attributes["taskmill.task"]: s for s in traced.spans("send default")}  # type: ignore[index]
    runs = {s.attributes["taskmill.task"]: s for s in traced.spans("process default")}  # type: ignore[index]
    assert parent_id(sends["notify"]) == span_id(runs["checkout"])
    assert parent_id(runs["notify"]) == span_id(sends["notify"])
    assert len({trace_id(s) for s in traced.spans()}) == 1


@pytest.mark.timeout(20)
def test_send_many_is_one_batch_span_whose_context_every_job_carries(traced: Traced) -> None:
    @traced.app.task(queue="thumbs")
    def thumb(n: int) -> None: ...

    handles = thumb.send_many([(n,) for n in range(3)])
    send = traced.one("send thumbs")
    attributes = dict(send.attributes or {})
    assert attributes["messaging.batch.message_count"] == 3
    assert "messaging.message.id" not in attributes
    for handle in handles:
        assert traced.app.get_job(handle.id).meta == {"traceparent": traceparent(send)}
    traced.app.run_until_idle()
    runs = traced.spans("process thumbs")
    assert sorted(str((s.attributes or {})["messaging.message.id"]) for s in runs) == sorted(
        h.id for h in handles
    )
    assert {parent_id(s) for s in runs} == {span_id(send)}


@pytest.mark.timeout(20)
def test_a_failed_broker_write_is_recorded_on_the_send_span(traced: Traced) -> None:
    @traced.app.task()
    def once() -> None: ...

    once.options(key="order-1").send()
    with pytest.raises(DuplicateJobError):
        once.options(key="order-1", on_conflict="raise").send()
    failed = [s for s in traced.spans("send default") if s.status.status_code is StatusCode.ERROR]
    assert len(failed) == 1
    assert failed[0].events[0].name == "exception"
    error_type = (failed[0].events[0].attributes or {})["exception.type"]
    assert error_type == "taskmill.errors.DuplicateJobError"


@pytest.mark.timeout(20)
def test_a_tracestate_travels_with_the_traceparent(traced: Traced) -> None:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    @traced.app.task()
    def noop() -> None: ...

    incoming = {
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "tracestate": "vendor=opaque",
    }
    context = TraceContextTextMapPropagator().extract(incoming)
    with traced.tracer.start_as_current_span("request", context=context):
        handle = noop.send()
    meta = traced.app.get_job(handle.id).meta
    assert meta["tracestate"] == "vendor=opaque"
    traced.app.run_until_idle()
    process = traced.one("process default")
    assert trace_id(process) == 0x0AF7651916CD43DD8448EB211C80319C
    assert process.context is not None
    assert process.context.trace_state.get("vendor") == "opaque"


@pytest.mark.timeout(20)
def test_without_an_sdk_nothing_is_stored_and_jobs_run() -> None:
    app = App("memory://")
    instrument(app, tracer_provider=trace.NoOpTracerProvider())

    @app.task()
    def add(a: int, b: int) -> int:
        return a + b

    handle = add.options(meta={"k": "v"}).send(1, 2)
    assert app.get_job(handle.id).meta == {"k": "v"}
    app.run_until_idle()
    assert handle.result(timeout=5) == 3
    app.close()


@pytest.mark.timeout(20)
def test_instrument_is_once_per_app_and_uninstrument_stops_tracing(traced: Traced) -> None:
    assert instrument(traced.app) is traced.instrumentation
    assert [
        i for i in traced.app.registry.instrumentations if isinstance(i, TaskmillInstrumentation)
    ] == [traced.instrumentation]

    @traced.app.task()
    def noop() -> None: ...

    uninstrument(traced.app)
    handle = noop.send()
    traced.app.run_until_idle()
    assert traced.spans() == []
    assert traced.app.get_job(handle.id).meta == {}


# --- a real worker process ----------------------------------------------------------------------

WORKER_APP = '''
"""The worker's side: its own tracer provider, set up where the app is imported."""

import os

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

from taskmill import App
from taskmill.integrations.otel import instrument

app = App()  # TASKMILL_URL

provider = TracerProvider()
# one file per process: with --pool process, the children run the functions and export too
spans_file = open(os.path.join(os.environ["SPANS_DIR"], f"{os.getpid()}.jsonl"), "a")
provider.add_span_processor(
    SimpleSpanProcessor(
        ConsoleSpanExporter(out=spans_file, formatter=lambda s: s.to_json(indent=None) + "\\n")
    )
)
trace.set_tracer_provider(provider)
instrument(app)
tracer = trace.get_tracer("traced_worker")


@app.task(name="traced.greet", retries=0)
def greet(name: str) -> str:
    with tracer.start_as_current_span("compose greeting"):
        return f"hello {name}"
'''


def read_spans(directory: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for path in directory.glob("*.jsonl")
        for line in path.read_text().splitlines()
        if line.strip()
    ]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("pool", ["thread", "process"])
def test_the_trace_crosses_into_a_worker_process(traced: Traced, tmp_path: Path, pool: str) -> None:
    (tmp_path / "traced_worker.py").write_text(textwrap.dedent(WORKER_APP))
    url = "sqlite:///" + str(tmp_path / "jobs.db")
    spans_dir = tmp_path / "spans"
    spans_dir.mkdir()

    producer = App(url)
    instrument(producer, tracer_provider=traced.provider)

    @producer.task(name="traced.greet")
    def greet(name: str) -> str:
        raise AssertionError("the worker process runs it, with its own declaration")

    handle = greet.send("ada")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKMILL_")}
    env |= {
        "TASKMILL_URL": url,
        "SPANS_DIR": str(spans_dir),
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT / "src")]),
    }
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "taskmill",
            "worker",
            "traced_worker:app",
            "-c",
            "2",
            "--pool",
            pool,
        ],
        env=env,
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        assert handle.result(timeout=45) == "hello ada"

        def worker_spans() -> list[dict[str, Any]] | None:
            spans = read_spans(spans_dir)
            return spans if len(spans) >= 2 else None

        spans = {s["name"]: s for s in wait_until(worker_spans, timeout=15, what="2 spans")}
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        log.close()
    send = traced.one("send default")
    process, inner = spans["process default"], spans["compose greeting"]
    assert process["kind"] == "SpanKind.CONSUMER"
    assert process["context"]["trace_id"] == f"0x{trace_id(send):032x}"
    assert process["parent_id"] == f"0x{span_id(send):016x}"
    assert process["attributes"]["messaging.message.id"] == handle.id
    # made by the function: in the worker's process, or (--pool process) in its child
    assert inner["context"]["trace_id"] == process["context"]["trace_id"]
    assert inner["parent_id"] == process["context"]["span_id"]
    processes = {path.stem for path in spans_dir.glob("*.jsonl")}
    assert len(processes) == (2 if pool == "process" else 1)
    producer.close()
