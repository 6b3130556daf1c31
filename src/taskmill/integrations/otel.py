"""OpenTelemetry tracing of taskmill jobs: ``instrument(app)`` (``pip install 'taskmill[otel]'``).

Each send makes a ``send {queue}`` span (kind PRODUCER) around the broker write and stores
its W3C trace context (``traceparent``, and ``tracestate`` when there is one) in the job's
metadata; each run makes a ``process {queue}`` span (kind CONSUMER) around the function,
a child of that context and linked to it, current while the function runs (in a ``--pool
process`` child too), so the spans the function makes (and the sends it makes) belong to the
job's trace. Attributes follow the
OpenTelemetry messaging conventions (``messaging.system`` = ``"taskmill"``, the queue as
``messaging.destination.name``, the job id as ``messaging.message.id``), with
``taskmill.task`` and ``taskmill.attempt``; an exception the function raised is recorded on
its span (status ERROR, an ``exception`` event, ``error.type``). See docs/opentelemetry.md.

The spans go to the tracer provider given, else the global one: with the API alone (no SDK
configured) they are non-recording, nothing is stored with the job, and the cost is a few
microseconds a send and a run. Only the API is imported here; the SDK is the user's choice.

    >>> from taskmill import App
    >>> app = App("memory://")
    >>> tracing = instrument(app)
    >>> instrument(app) is tracing  # once per app
    True
    >>> uninstrument(app)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import msgspec
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

import taskmill
from taskmill.app import App
from taskmill.job import Job, Meta, NewJob

__all__ = ["TaskmillInstrumentation", "instrument", "uninstrument"]

SYSTEM = "taskmill"
"""The ``messaging.system`` of every span."""


class TaskmillInstrumentation:
    """The ``taskmill.hooks.CarriedInstrumentation`` that traces: ``instrument(app)`` makes
    and adds one. ``tracer_provider``: where the spans go (default: the global provider, as
    it is when a span starts, so one configured after ``instrument`` is used).
    ``propagator``: how the trace context is written into a job's metadata and read back
    (default: W3C Trace Context; ``opentelemetry.propagate.get_global_textmap()`` for the
    process's configured one, whose keys, baggage included, then count against the job's
    4 KiB of metadata)."""

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        propagator: TextMapPropagator | None = None,
    ) -> None:
        self._tracer = trace.get_tracer(
            "taskmill.integrations.otel", taskmill.__version__, tracer_provider
        )
        self._propagator = propagator or TraceContextTextMapPropagator()

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"

    @contextlib.contextmanager
    def sending(self, jobs: Sequence[NewJob]) -> Iterator[Sequence[NewJob]]:
        """A ``send {queue}`` span around the broker write; the jobs with its context added
        to their metadata (one span for a batch: ``messaging.batch.message_count``)."""
        if not jobs:
            yield jobs
            return
        queues = {job.queue for job in jobs}
        queue = jobs[0].queue if len(queues) == 1 else None
        with self._tracer.start_as_current_span(
            "send" if queue is None else f"send {queue}",
            kind=SpanKind.PRODUCER,
            attributes=_send_attributes(jobs, queue),
        ):
            carrier: dict[str, str] = {}
            self._propagator.inject(carrier)
            if not carrier:  # no trace at all (the API without an SDK): nothing to store
                yield jobs
                return
            yield [msgspec.structs.replace(j, meta={**j.meta, **carrier}) for j in jobs]

    @contextlib.contextmanager
    def running(self, job: Job) -> Iterator[None]:
        """A ``process {queue}`` span around the call, a child of the context the send stored
        and linked to it, current while the function runs."""
        carrier = {key: value for key, value in job.meta.items() if isinstance(value, str)}
        sent = self._propagator.extract(carrier)
        sent_span = trace.get_current_span(sent).get_span_context()
        with self._tracer.start_as_current_span(
            f"process {job.queue}",
            context=sent,
            kind=SpanKind.CONSUMER,
            attributes=_process_attributes(job),
            links=[Link(sent_span)] if sent_span.is_valid else None,
            record_exception=False,  # recorded below, with error.type
            set_status_on_exception=False,
        ) as span:
            try:
                yield
            except BaseException as exc:  # the job's error (a time limit, an interrupt too)
                span.set_attribute("error.type", _error_type(exc))
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
                raise

    def carry(self) -> Meta:
        """In the worker, inside ``running``: the ``process`` span's context, for a
        ``--pool process`` child to make current around the function."""
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier)
        return dict(carrier)

    @contextlib.contextmanager
    def carried(self, meta: Meta) -> Iterator[None]:
        """In a ``--pool process`` child: the worker's ``process`` span current again, so
        the spans the function makes are its children."""
        carrier = {key: value for key, value in meta.items() if isinstance(value, str)}
        token = otel_context.attach(self._propagator.extract(carrier))
        try:
            yield
        finally:
            otel_context.detach(token)


def _error_type(exc: BaseException) -> str:
    """``error.type`` as the SDK writes ``exception.type``: ``ValueError``,
    ``taskmill.errors.TaskTimeoutError``."""
    module, name = type(exc).__module__, type(exc).__qualname__
    return name if module == "builtins" else f"{module}.{name}"


def _send_attributes(jobs: Sequence[NewJob], queue: str | None) -> dict[str, AttributeValue]:
    attributes: dict[str, AttributeValue] = {
        "messaging.system": SYSTEM,
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
    }
    if queue is not None:
        attributes["messaging.destination.name"] = queue
    if len(jobs) == 1:
        attributes["messaging.message.id"] = jobs[0].id
        attributes["taskmill.task"] = jobs[0].task
    else:
        attributes["messaging.batch.message_count"] = len(jobs)
        tasks = {job.task for job in jobs}
        if len(tasks) == 1:
            attributes["taskmill.task"] = jobs[0].task
    return attributes


def _process_attributes(job: Job) -> dict[str, AttributeValue]:
    return {
        "messaging.system": SYSTEM,
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": job.queue,
        "messaging.message.id": job.id,
        "taskmill.task": job.task,
        "taskmill.attempt": job.attempt,
        "taskmill.max_attempts": job.max_attempts,
    }


def instrument(
    app: App,
    *,
    tracer_provider: trace.TracerProvider | None = None,
    propagator: TextMapPropagator | None = None,
) -> TaskmillInstrumentation:
    """Trace ``app``'s sends and runs (see the module); the instrumentation added. Call it
    where both the producer and the worker run it: in the app's module, or in each process's
    start-up. An app already instrumented keeps its instrumentation (the one returned);
    ``uninstrument`` first to change the provider or the propagator."""
    for added in app.registry.instrumentations:
        if isinstance(added, TaskmillInstrumentation):
            return added
    instrumentation = TaskmillInstrumentation(tracer_provider, propagator)
    app.add_instrumentation(instrumentation)
    return instrumentation


def uninstrument(app: App) -> None:
    """Stop tracing ``app`` (no error if it was not instrumented)."""
    for added in list(app.registry.instrumentations):
        if isinstance(added, TaskmillInstrumentation):
            app.remove_instrumentation(added)
