"""A server broker's server restarted mid-run: nothing acknowledged is lost, and the worker
process carries on without a restart of its own.

The case runs on each server broker, with the server stopped (a clean shutdown) or killed
(Redis: SIGKILL, with ``appendfsync always``; PostgreSQL: an immediate shutdown, so the next
start replays the WAL; NATS: SIGKILL, with ``sync_interval: always``), each time on a server
of the test's own (``redis_server_aof``, ``postgres_server_own``, ``nats_server_own``).
Workers are real ``taskmill worker`` processes. Waiting is polling until a deadline; the only
sleeps are the outage's length (in ``restart``) and the producer's pacing.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest

from taskmill import App, BrokerUnavailableError, JobState
from taskmill.testing import wait_until

from . import nats_app, postgres_app, redis_app
from .support import Workers, all_jobs, state_counts, wait_registered


class Restartable(Protocol):
    def restart(self, *, kill: bool = False, down_s: float = 0.0) -> None: ...


@dataclass(frozen=True)
class ServerBroker:
    """How the case runs on one server broker."""

    worker_app: str
    """What the worker processes load: ``redis_app:app`` or ``postgres_app:app``."""
    settings: dict[str, Any]
    """That app's settings, which the test's own app shares (leases of a few seconds)."""
    work: Callable[..., int]
    """That app's ``work`` task function, which the test's own app sends."""
    server: Callable[[pytest.FixtureRequest], tuple[Restartable, str]]
    """A server of the test's own, and the URL of a fresh store on it."""
    pause_s: float
    """Each job's length. With the producer's pacing it builds a backlog, so the restart lands
    with jobs both running and queued (a send to Redis is quicker than one to PostgreSQL)."""
    pacing_s: float
    resend_timeout_s: float
    """How long the producer may take to send 300 more jobs once the server is back."""


def _redis_server(request: pytest.FixtureRequest) -> tuple[Restartable, str]:
    server = request.getfixturevalue("redis_server_aof")
    return server, f"{server.url}?prefix=restart{uuid.uuid4().hex[:10]}:"


def _postgres_server(request: pytest.FixtureRequest) -> tuple[Restartable, str]:
    server = request.getfixturevalue("postgres_server_own")
    return server, server.create_database(f"t_{uuid.uuid4().hex[:12]}")


def _nats_server(request: pytest.FixtureRequest) -> tuple[Restartable, str]:
    server = request.getfixturevalue("nats_server_own")  # sync_interval: always
    return server, f"{server.url}?prefix=restart{uuid.uuid4().hex[:10]}"


BROKERS = {
    "redis": ServerBroker(
        "redis_app:app",
        redis_app.SETTINGS,
        redis_app.work,
        _redis_server,
        pause_s=0.02,
        pacing_s=0.001,
        resend_timeout_s=30,
    ),
    "postgres": ServerBroker(
        "postgres_app:app",
        postgres_app.SETTINGS,
        postgres_app.work,
        _postgres_server,
        pause_s=0.01,
        pacing_s=0.002,
        resend_timeout_s=40,
    ),
    "nats": ServerBroker(
        "nats_app:app",
        nats_app.SETTINGS,
        nats_app.work,
        _nats_server,
        pause_s=0.02,
        pacing_s=0.001,
        resend_timeout_s=30,
    ),
}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("how", ["stop", "kill"])
@pytest.mark.parametrize("broker", sorted(BROKERS))
def test_restart_loses_no_acknowledged_job_and_workers_carry_on(
    broker: str, how: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The server is stopped or killed mid-run and started again a second later on the same
    port. A producer sends throughout; every job whose ``send`` returned is completed
    afterwards by the same worker process, which was never restarted."""
    kind = BROKERS[broker]
    server, url = kind.server(request)
    app = App(url, **kind.settings)
    task = app.task(name="work", retries=5, backoff=0.05)(kind.work)
    workers = Workers(tmp_path, kind.worker_app)
    acked: list[str] = []
    refused: list[BaseException] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def produce() -> None:
        n = 0
        while not stop.is_set():
            try:
                acked.append(task.send(n, kind.pause_s).id)
            except BrokerUnavailableError as exc:  # allowed during the outage: not acknowledged
                refused.append(exc)
            except BaseException as exc:
                errors.append(exc)
                return
            n += 1
            time.sleep(kind.pacing_s)  # pacing: the run spans the restart

    try:
        proc = workers.start(url, "--concurrency", "8")
        wait_registered(app, proc, workers)
        producer = threading.Thread(target=produce, name="producer", daemon=True)
        producer.start()
        try:
            wait_until(lambda: len(acked) >= 300 or errors, what="300 jobs sent", timeout=20)
            # the restart lands with jobs running and waiting, not on an idle worker
            wait_until(
                lambda: (counts := state_counts(app)).get("running") and counts.get("queued"),
                what=lambda: f"jobs both running and queued: {state_counts(app)}",
                timeout=20,
            )
            before = len(acked)
            server.restart(kill=how == "kill", down_s=1.0)
            wait_until(
                lambda: len(acked) >= before + 300 or errors,
                what="the producer to send 300 more jobs after the restart",
                timeout=kind.resend_timeout_s,
            )
        finally:
            stop.set()
            producer.join(30)
        assert not errors, f"the producer failed with {errors[0]!r}"

        def missing() -> set[str]:
            return set(acked) - set(all_jobs(app, JobState.SUCCEEDED))

        wait_until(
            lambda: not missing(),
            what=lambda: (
                f"{len(missing())} of {len(acked)} acknowledged jobs to succeed; "
                f"worker output:\n{workers.output()[-5000:]}"
            ),
            timeout=60,
        )
        assert proc.poll() is None, f"the worker exited:\n{workers.output()}"
        assert not all_jobs(app, JobState.FAILED)
        assert task.send(-1).result(timeout=10) == -1  # and the same worker takes new work
        assert proc.poll() is None
    finally:
        app.close()
        workers.close()
