"""Broker calls are timed and logged once, at the seam (``brokers/_instrument.py``), with the
fields of the job they are about."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import pytest

from taskmill import App, DuplicateJobError
from taskmill.brokers import _instrument
from taskmill.brokers.base import Broker
from taskmill.brokers.features import FEATURES
from taskmill.brokers.memory import MemoryBroker
from taskmill.brokers.postgres import PostgresBroker
from taskmill.brokers.redis import RedisBroker
from taskmill.brokers.sqlite import SQLiteBroker
from taskmill.errors import BrokerUnavailableError
from taskmill.job import Finish, Job

LOGGER = "taskmill.broker"


class Unreachable(MemoryBroker):
    """``get`` and claims fail as a server that does not answer would."""

    async def get(self, job_id: str) -> Job | None:
        raise BrokerUnavailableError("the server did not answer within 5 s")

    async def finish_and_claim(
        self,
        finishes: Sequence[Finish],
        queues: Sequence[str],
        limit: int,
        worker_id: str,
        lease_s: float,
    ) -> tuple[list[bool], list[Job]]:
        raise BrokerUnavailableError("the server did not answer within 5 s")


@pytest.fixture
def app() -> Iterator[App]:
    app = App("memory://")
    yield app
    app.close()


def _calls(caplog: pytest.LogCaptureFixture, method: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and getattr(r, "method", "") == method]


def _fields(record: logging.LogRecord, *names: str) -> tuple[object, ...]:
    return tuple(getattr(record, name, None) for name in names)


def test_at_debug_each_call_logs_its_time_and_its_jobs_fields(
    app: App, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)

    @app.task(queue="mail")
    def send_mail(to: str) -> None: ...

    handle = send_mail.send("a@example.com")
    app.run_until_idle()

    (sent,) = _calls(caplog, "enqueue_blocking")
    assert sent.levelno == logging.DEBUG
    assert sent.getMessage().startswith("memory.enqueue_blocking took ")
    assert _fields(sent, "broker", "jobs", "job_id", "task", "queue") == (
        "memory",
        1,
        handle.id,
        send_mail.name,
        "mail",
    )
    (duration,) = _fields(sent, "duration_s")
    assert isinstance(duration, float) and duration >= 0

    claims = [
        r
        for method in ("claim", "finish_and_claim")  # the memory broker's is claim after finish
        for r in _calls(caplog, method)
        if getattr(r, "claimed", 0) == 1
    ]
    assert claims, "the claim of the job was logged"
    assert _fields(claims[0], "job_id", "task", "queue", "attempt") == (
        handle.id,
        send_mail.name,
        "mail",
        1,
    )

    app.get_job(handle.id)
    (read,) = _calls(caplog, "get")
    assert _fields(read, "job_id", "task", "attempt") == (handle.id, send_mail.name, 1)


def test_without_debug_a_call_that_went_well_logs_nothing(
    app: App, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)

    @app.task
    def noop() -> None: ...

    noop.send()
    app.run_until_idle()
    assert [r for r in caplog.records if r.name == LOGGER] == []


def test_a_slow_call_is_a_warning_but_a_wait_never_is(
    app: App, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    monkeypatch.setattr(_instrument, "SLOW_CALL_S", 0.0)
    broker = app.broker
    app.open()
    app.run_sync(broker.get("nothing-here"))
    app.run_sync(broker.wait(["default"], 0.01))
    (slow,) = _calls(caplog, "get")
    assert slow.levelno == logging.WARNING
    assert slow.getMessage().startswith("memory.get took ") and "(slow)" in slow.getMessage()
    assert _fields(slow, "job_id") == ("nothing-here",)
    assert _calls(caplog, "wait") == []


def test_a_failed_call_is_logged_at_debug_with_the_error(caplog: pytest.LogCaptureFixture) -> None:
    """At DEBUG only: the caller reports the failure its own way (a worker's error line, the
    command line's one line), and the error it gets is the broker's own."""
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    app = App("memory://")
    app.client.use_broker(Unreachable())
    try:
        with pytest.raises(BrokerUnavailableError):
            app.get_job("j1")
        with pytest.raises(BrokerUnavailableError):  # a failed claim has no result to read
            app.run_sync(app.broker.finish_and_claim([], ["default"], 1, "w", 30.0))
    finally:
        app.close()
    (claim,) = _calls(caplog, "finish_and_claim")
    assert _fields(claim, "jobs", "claimed") == (0, None)
    (failed,) = _calls(caplog, "get")
    assert failed.levelno == logging.DEBUG
    assert failed.getMessage().startswith("memory.get failed after ")
    assert _fields(failed, "job_id", "error") == (
        "j1",
        "BrokerUnavailableError: the server did not answer within 5 s",
    )


def test_a_refusal_the_caller_gets_is_logged_at_debug(
    app: App, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)

    @app.task
    def once() -> None: ...

    once.options(key="k").send()
    with pytest.raises(DuplicateJobError):
        once.options(key="k", on_conflict="raise").send()
    (refused,) = [r for r in _calls(caplog, "enqueue_blocking") if hasattr(r, "error")]
    assert refused.levelno == logging.DEBUG
    assert str(_fields(refused, "error")[0]).startswith("DuplicateJobError: ")


@pytest.mark.parametrize("broker", [MemoryBroker, SQLiteBroker, RedisBroker, PostgresBroker])
def test_every_method_of_every_broker_is_instrumented_once(broker: type[Broker]) -> None:
    contract = _instrument.contract_methods([Broker, *FEATURES])
    overridden = [name for name in contract if name in vars(broker)]
    assert {"enqueue", "claim", "finish", "get_many", "queue_depth"} <= set(overridden)
    for name in overridden:
        method = vars(broker)[name]
        assert _instrument.is_instrumented(method), f"{broker.__name__}.{name}"
        assert not _instrument.is_instrumented(method.__wrapped__), f"{name} wrapped twice"
    assert broker.name in {"memory", "sqlite", "redis", "postgres"}
