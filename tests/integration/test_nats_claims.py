"""What docs/brokers.md says of the NATS broker that no other test shows: the warnings at start
about storage that loses jobs, a job too large for the server's ``max_payload`` refused at
send, and the clock taken from the server's stamps rather than the local one. Each against the
session's ``nats-server`` under a prefix of its own."""

from __future__ import annotations

import logging
import time
import types
import uuid

import pytest

from servers import NatsServer
from taskmill import App, JobFailedError, JobNotFoundError, PayloadTooLargeError
from taskmill.testing import running_worker

pytestmark = pytest.mark.timeout(60)


def _url(server_url: str, options: str = "") -> str:
    return f"{server_url}?prefix=d{uuid.uuid4().hex[:10]}{options}"


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "taskmill.brokers.nats" and r.levelno == logging.WARNING
    ]


def test_start_warns_of_memory_storage(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    app = App(_url(nats_server.url, "&storage=memory"))
    try:
        with caplog.at_level(logging.WARNING, logger="taskmill.brokers.nats"):
            app.open()
    finally:
        app.close()
    assert any("in memory: a server restart loses every job" in w for w in _warnings(caplog))


def test_start_warns_of_one_replica_when_several_servers_are_named(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    hostport = nats_server.url.split("://", 1)[1]
    # the same server twice: what the broker can tell is that the URL names two
    app = App(_url(f"nats://{hostport},{hostport}"))
    try:
        with caplog.at_level(logging.WARNING, logger="taskmill.brokers.nats"):
            app.open()
    finally:
        app.close()
    assert any("have one replica though 2 servers are named" in w for w in _warnings(caplog))


def test_file_storage_with_one_server_warns_of_nothing(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    app = App(_url(nats_server.url))
    try:
        with caplog.at_level(logging.WARNING, logger="taskmill.brokers.nats"):
            app.open()
    finally:
        app.close()
    assert _warnings(caplog) == []


def test_a_job_larger_than_the_servers_max_payload_fails_at_send(nats_server: NatsServer) -> None:
    """The session's server allows 8 MB messages; taskmill's own limit raised past that, a job
    of 9 MB is refused before anything is written, naming the server's setting."""
    app = App(_url(nats_server.url), max_payload_bytes=16 << 20)
    blob = app.task(name="blob")(lambda data: len(data))
    try:
        handle = blob.options(job_id="too-large")
        with pytest.raises(PayloadTooLargeError, match=r"max_payload of 8388608 bytes") as info:
            handle.send("x" * (9 << 20))
        assert "raise max_payload in the server's configuration" in str(info.value)
        with pytest.raises(JobNotFoundError):
            app.get_job("too-large")
        assert blob.send("x" * (1 << 20)).status().value == "queued"  # 1 MiB fits
    finally:
        app.close()


def test_the_clock_is_the_servers_not_the_local_one(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process whose clock is an hour fast still writes the server's time: the offset it
    measures from a stored message's stamp cancels its own error."""
    from taskmill.brokers.nats import core

    fast = types.SimpleNamespace(
        time=lambda: time.time() + 3600.0, monotonic=time.monotonic, time_ns=time.time_ns
    )
    monkeypatch.setattr(core, "time", fast)
    app = App(_url(nats_server.url))
    try:
        server_now = app.run_sync(app.broker.now())
        assert abs(server_now - time.time()) < 0.5, "the local clock's hour leaked through"
        job = app.get_job(app.task(name="noop")(lambda: None).send().id)
        assert abs(job.enqueued_at - time.time()) < 5.0
    finally:
        app.close()


def test_a_result_too_large_for_the_server_fails_the_job_clearly(nats_server) -> None:
    """The server's max_payload bounds a record; a result that would pass it cannot be stored,
    so the job fails with an error that says why (rather than a finish retried for ever)."""
    app = App(f"{nats_server.url}?prefix=big{uuid.uuid4().hex[:8]}", max_payload_bytes=1 << 20)

    @app.task(retries=3)
    def huge() -> str:
        return "x" * (9 << 20)  # the test server allows 8 MB messages

    try:
        with running_worker(app):
            handle = huge.send()
            with pytest.raises(JobFailedError) as info:
                handle.result(timeout=20)
        assert info.value.type == "taskmill.errors.PayloadTooLargeError"
        assert "max_payload" in info.value.message
        assert app.get_job(handle.id).attempt == 1, "a result too large is not retried"
    finally:
        app.close()
