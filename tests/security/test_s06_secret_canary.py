"""S6, secret canary: a redacted argument value (a ``password`` argument: a name the dashboard
redacts) and the broker's password (the server's ``requirepass``, a PostgreSQL role's
scram-sha-256 password, a NATS user's password), through jobs that succeed, fail and retry on
a ``taskmill worker`` logging at DEBUG, over TLS. Neither canary may appear in the worker's or
the producer's logs, the live events, the stored errors, the dashboard's pages and JSON API,
the metrics, the messages of the errors a bad URL raises, or the ``repr`` of the app, the
broker, the jobs and the handles. (The argument is in the broker's stored payload: the worker
needs it. What is checked is that taskmill shows it nowhere else.)"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys
import threading
import uuid
import warnings
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from examples._support.serving import serve as serve_asgi

from security.canary_app import build
from security.conftest import BROKER_PASSWORD, Worker, broker_url
from security.tls import Pki
from servers import free_port
from taskmill import App, JobState
from taskmill.events import Event
from taskmill.testing import wait_until
from taskmill.web import WebConfig, create_app

pytestmark = pytest.mark.timeout(150)

FINISHED = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class EventLog:
    """Every live event of the app, collected on a thread of its own until ``close()``."""

    def __init__(self, app: App) -> None:
        self.events: list[Event] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._run(app),), daemon=True)
        self._thread.start()

    async def _run(self, app: App) -> None:
        async def consume() -> None:
            async for event in app.events():
                self.events.append(event)

        task = asyncio.create_task(consume())
        while not self._stop.is_set() and not task.done():
            await asyncio.sleep(0.05)  # polls a flag: nothing here waits for the events
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    def close(self) -> None:
        self._stop.set()
        self._thread.join(15)


def _unclosed_sockets() -> list[str]:
    """Collect garbage now and return what it found left open (ResourceWarnings), instead of
    letting a later test's collection fail on it. An open socket found here is reported in
    the figures (an intermittent one was seen, not yet traced: docs/reliability.md, S6)."""
    seen: list[str] = []
    old_hook = sys.unraisablehook
    sys.unraisablehook = lambda u: seen.append(str(u.exc_value))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            gc.collect()
        seen += [str(w.message) for w in caught]
    finally:
        sys.unraisablehook = old_hook
    return [s for s in seen if "unclosed <socket" in s]


def _dashboard_texts(app: App, ids: list[str]) -> dict[str, str]:
    """Every page and API answer that shows these jobs, as text."""
    served = serve_asgi(create_app(app, WebConfig()), lifespan="off", grace_s=2, timeout_s=15)
    paths = ["/", "/jobs", "/jobs?state=failed", "/jobs?state=succeeded", "/workers",
             "/partials/overview", "/api/v1/jobs?limit=200", "/api/v1/queues",
             "/api/v1/workers", "/api/v1/tasks", "/metrics", "/health", "/ready"]  # fmt: skip
    for job_id in ids:
        paths += [f"/job?id={job_id}", f"/partials/job?id={job_id}", f"/api/v1/jobs/{job_id}"]
    texts: dict[str, str] = {}
    try:
        with httpx.Client(base_url=served.url, timeout=15) as client:
            for path in paths:
                response = client.get(path)
                assert response.status_code == 200, (path, response.text[:300])
                texts[path] = response.text
    finally:
        served.stop()
    return texts


def _error_texts(kind: str, request: pytest.FixtureRequest, pki: Pki) -> dict[str, str]:
    """The messages of what a URL with the password raises: a port where nothing listens, a
    CA that did not sign the server's certificate."""
    texts: dict[str, str] = {}
    good = broker_url(kind, request)
    port = good.split("@", 1)[1].split("/", 1)[0].split("?", 1)[0].rsplit(":", 1)[1]
    for name, url in (
        ("closed port", good.replace(f":{port}", f":{free_port()}", 1)),
        ("wrong CA", broker_url(kind, request, ca=pki.wrong_ca)),
    ):
        app = build(url.replace("unavailable_after", "x") + "")
        try:
            app.get_task("sec.ok").send(1, "x")
        except Exception as exc:
            chain: list[str] = []
            seen: BaseException | None = exc
            while seen is not None:
                chain.append(f"{type(seen).__name__}: {seen} {seen!r}")
                seen = seen.__cause__ or seen.__context__
            texts[name] = "\n".join(chain)
        else:
            raise AssertionError(f"{name}: the send succeeded")
        finally:
            app.close()
    return texts


def server_port(kind: str, request: pytest.FixtureRequest) -> int:
    name = {"redis": "tls_redis", "postgres": "tls_postgres", "nats": "tls_nats"}[kind]
    return int(request.getfixturevalue(name).port)


@pytest.mark.parametrize("kind", ["redis", "postgres", "nats"])
def test_s06_secret_canary(
    kind: str,
    request: pytest.FixtureRequest,
    pki: Pki,
    worker: Callable[..., Worker],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    arg_secret = f"argsecret{uuid.uuid4().hex[:16]}"
    canaries = {"argument": arg_secret, "broker password": BROKER_PASSWORD}
    url = broker_url(kind, request)
    assert BROKER_PASSWORD in url
    w = worker(url, "-c", "4", "--log-level", "debug")
    app = build(url)
    log = EventLog(app)
    try:
        ok, fail, flaky = (app.get_task(n) for n in ("sec.ok", "sec.fail", "sec.flaky"))
        handles = [ok.send(n, arg_secret) for n in range(3)]
        handles += [ok.send(n, password=arg_secret) for n in range(3)]
        handles += [fail.send(n, arg_secret) for n in range(3)]
        handles += [flaky.send(n, password=arg_secret) for n in range(3)]

        def finished() -> bool:
            return all(app.get_job(h.id).state in FINISHED for h in handles)

        wait_until(finished, timeout=90, what="every job to finish", interval=0.1)
        jobs = [app.get_job(h.id) for h in handles]
        states = [j.state for j in jobs]
        assert (
            states == [JobState.SUCCEEDED] * 6 + [JobState.FAILED] * 3 + [JobState.SUCCEEDED] * 3
        ), w.output()
        assert [j.attempt for j in jobs[9:]] == [2, 2, 2]
        wait_until(lambda: len(log.events) > 0, timeout=10, what="an event")
        texts: dict[str, str] = {}
        texts.update(_dashboard_texts(app, [h.id for h in handles]))
        texts["stored errors"] = "\n".join(repr(j.error) for j in jobs)
        texts["repr"] = "\n".join(
            [repr(app), repr(app.broker), *map(repr, jobs), *map(repr, handles)]
        )
        texts.update(_error_texts(kind, request, pki))
    finally:
        log.close()
        app.close()
    assert w.stop() == 0
    leaks = _unclosed_sockets()
    texts["events"] = "\n".join(repr(e) for e in log.events)
    texts["worker log"] = w.output()
    texts["producer log"] = "\n".join(
        f"{r.getMessage()} {r.__dict__} {r.exc_text or ''}" for r in caplog.records
    )
    found: dict[str, Any] = {
        f"{where}: {what}": text.count(secret)
        for where, text in texts.items()
        for what, secret in canaries.items()
        if secret in text
    }
    assert found == {}, "canaries found"
    debug_lines = texts["worker log"].count(" DEBUG ")
    print(
        f"S6 {kind}: 12 jobs (6 ok, 3 failed, 3 retried), {len(log.events)} events, "
        f"{len(texts)} texts scanned ({sum(map(len, texts.values())):,} chars, worker log "
        f"{len(texts['worker log'].splitlines())} lines, {debug_lines} DEBUG), canaries found 0; "
        f"sockets left open {len(leaks)} {leaks} (server port {server_port(kind, request)})"
    )
