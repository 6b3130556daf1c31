"""S9, tenant isolation: on each server broker, two tenants separated by the broker's own
access control (Redis ACL users limited to their key prefix, channels and taskmill's commands;
PostgreSQL roles each owning a schema; NATS accounts). Tenant a's app works end to end; then
every operation taskmill has is tried with tenant a's credentials on tenant b's prefix or
schema, and each must be refused by the broker with a taskmill error, or (where the broker
lets a tenant see only its own data, as NATS accounts do) find nothing; tenant b's jobs are
unchanged afterwards, and no password appears in an error, a log record or a ``repr``.

SQLite and the memory broker have no credentials (one file or object of one process): n/a.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from examples._support.serving import serve as serve_asgi

from security.canary_app import build
from security.conftest import Worker
from security.tenants import (
    TASKMILL_REDIS_COMMANDS,
    AccountsNatsServer,
    AclRedisServer,
    PermissionsNatsServer,
    TenantPostgresServer,
    Tenants,
)
from taskmill import App, JobState
from taskmill.errors import BrokerError, JobNotFoundError
from taskmill.job import Claim, Finish, Succeeded
from taskmill.testing import wait_until
from taskmill.web import WebConfig, create_app

pytestmark = pytest.mark.timeout(90)

REFUSALS = {
    "redis": ("refused this URL's user",),
    "postgres": ("permission denied",),
    "nats": ("permissions violation", "authorization violation"),
    "nats-permissions": ("permissions violation",),
}


@pytest.fixture
def tenants(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Tenants]:
    kind: str = request.param
    tag = uuid.uuid4().hex[:12]
    if kind == "redis":
        redis_server = AclRedisServer(tmp_path / "redis", tag, TASKMILL_REDIS_COMMANDS)
        redis_server.start()
        try:
            yield redis_server.tenants()
        finally:
            redis_server.kill()
    elif kind == "postgres":
        pg = TenantPostgresServer(tag)
        try:
            pg.start()
            pg.add_tenants()
            yield pg.tenants()
        finally:
            pg.cleanup()
    elif kind == "nats-permissions":
        perm_server = PermissionsNatsServer(tmp_path / "nats", tag)
        perm_server.start()
        try:
            yield perm_server.tenants()
        finally:
            perm_server.kill()
    else:
        nats_server = AccountsNatsServer(tmp_path / "nats", tag)
        nats_server.start()
        try:
            yield nats_server.tenants()
        finally:
            nats_server.kill()


@dataclass
class Outcome:
    op: str
    verdict: str  # "refused", "not found" or "ALLOWED"
    detail: str
    seconds: float


@dataclass
class Tally:
    """The cross-tenant operations tried, and what each came to."""

    kind: str
    b_ids: set[str]
    """Tenant b's job ids: none may appear in what an operation returns."""
    outcomes: list[Outcome] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)

    def attempt(self, op: str, call: Callable[[], Any], *also: str) -> Any:
        """Run one cross-tenant operation: ``refused`` (a taskmill error naming the broker's
        refusal, or one of ``also``), ``not found`` (nothing to see, or a stale claim),
        ``own account`` (NATS: it ran, on tenant a's own account, and shows none of b's
        jobs), or ``ALLOWED`` (what S9 must never see). Returns what the call returned."""
        started = time.monotonic()
        got: Any = None
        try:
            got = call()
        except JobNotFoundError as exc:
            self.texts.append(f"{exc!s} {exc!r}")
            verdict, detail = "not found", f"{type(exc).__name__}: {exc}"
        except BrokerError as exc:
            self.texts.append(f"{exc!s} {exc!r} {exc.__cause__!r}")
            text = str(exc)
            words = (*REFUSALS[self.kind], *also)
            if exc.permanent and any(w.lower() in text.lower() for w in words):
                verdict = "refused"
            else:
                verdict = f"ALLOWED? another error: {type(exc).__name__}"
            detail = f"{type(exc).__name__}: {text[:160]}"
        else:
            shown = repr(got)
            self.texts.append(shown)
            if any(job_id in shown for job_id in self.b_ids):
                verdict = "ALLOWED"
            elif got is None or got in ([], 0, [False]) or _empty(got):
                verdict = "not found"
            elif self.kind == "nats":  # accounts: a's credentials reach only a's account
                verdict = "own account"
            else:
                verdict = "ALLOWED"
            detail = f"returned {shown}"[:200]
        self.outcomes.append(Outcome(op, verdict, detail, time.monotonic() - started))
        return got

    def count(self, *verdicts: str) -> int:
        return sum(o.verdict in verdicts for o in self.outcomes)


def _empty(got: Any) -> bool:
    """A listing with no jobs, stats with no job counted, an API answer with no jobs."""
    jobs = getattr(got, "jobs", None)
    if jobs is not None:
        return not jobs and not getattr(got, "total", 0)
    if isinstance(got, list) and all(hasattr(s, "counts") for s in got):
        return all(not any(s.counts.values()) for s in got)
    if isinstance(got, dict) and "jobs" in got:
        return not got["jobs"]
    return False


def _snapshot(app: App) -> dict[str, tuple[str, int]]:
    page = app.list_jobs(limit=100)
    return {j.id: (j.state.value, j.attempt) for j in page.jobs}


def _api_jobs(app: App) -> Any:
    """GET /api/v1/jobs of the dashboard of ``app``, served in-process: its JSON, or a
    BrokerError with the answer when it is not 200."""
    served = serve_asgi(create_app(app, WebConfig()), lifespan="off", grace_s=2, timeout_s=15)
    try:
        with httpx.Client(base_url=served.url, timeout=15) as client:
            response = client.get("/api/v1/jobs?limit=100")
    finally:
        served.stop()
    if response.status_code != 200:  # the broker's error is in the server's log (checked)
        error = f"HTTP {response.status_code}: {response.text[:300]}"
        raise BrokerError(error, permanent=response.status_code == 503)
    return response.json()


def _worker_refused(url: str, worker: Callable[..., Worker], texts: list[str]) -> None:
    """A ``taskmill worker`` on ``url`` must stop with exit code 3 (a permanent broker
    error, which a supervisor does not restart), its log naming the refusal: raised as a
    BrokerError (permanent if the exit code is 3) with the log's last lines."""
    w = worker(url, "-p", "1")
    wait_until(lambda: w.proc.poll() is not None, timeout=30, what="the worker to stop")
    out = w.output()
    texts.append(out)
    w.stop()
    code = w.proc.returncode
    error = out[out.rfind(" ERROR ") :].replace("\n", " ")  # the error it stopped on
    raise BrokerError(f"exit code {code}: {error}", permanent=code == 3)


@pytest.mark.parametrize(
    "tenants", ["redis", "postgres", "nats", "nats-permissions"], indirect=True
)
def test_s9_tenant_isolation(
    tenants: Tenants, caplog: pytest.LogCaptureFixture, worker: Callable[..., Worker]
) -> None:
    caplog.set_level(logging.DEBUG)
    kind = tenants.kind
    started = time.monotonic()
    app_b = build(tenants.urls["b"])
    app_a = build(tenants.urls["a"])
    cross = build(tenants.cross_url)
    tally = Tally(kind, set())
    try:
        # tenant b's jobs: one succeeded, one failed, one queued, one delayed
        ok_b, fail_b = app_b.get_task("sec.ok"), app_b.get_task("sec.fail")
        b_done, b_failed = ok_b.send(1, "b-secret"), fail_b.send(2, "b-secret")
        assert app_b.run_until_idle() == 2
        b_queued = ok_b.send(3, "b-secret")
        b_delayed = ok_b.options(delay=3600).send(4, "b-secret")
        before = _snapshot(app_b)
        assert set(before) == {b_done.id, b_failed.id, b_queued.id, b_delayed.id}, before
        tally.b_ids.update(before)

        # tenant a's app, end to end: send, a worker drains, results, lists, cancel, retry
        ok_a, fail_a = app_a.get_task("sec.ok"), app_a.get_task("sec.fail")
        a_ok, a_fail = ok_a.send(5, "pw"), fail_a.send(6, "pw")
        a_later = ok_a.options(delay=3600).send(7, "pw")
        assert app_a.run_until_idle() == 2
        assert a_ok.result(timeout=10) == {"n": 5, "length": 2}
        assert app_a.get_job(a_fail.id).state is JobState.FAILED
        assert {j.id for j in app_a.list_jobs().jobs} == {a_ok.id, a_fail.id, a_later.id}
        assert [j.id for j in app_a.list_jobs(state="failed").jobs] == [a_fail.id]
        assert app_a.cancel_job(a_later.id) is JobState.CANCELLED
        assert app_a.retry_jobs([a_fail.id]) == [a_fail.id]
        assert app_a.run_until_idle() == 1
        assert app_a.get_job(a_fail.id).attempt == 1  # a fresh attempt budget, failed again
        assert {s.queue: s.counts["failed"] for s in app_a.stats()} == {"default": 1}
        # and tenant a sees none of b's jobs through its own URL
        assert not set(_snapshot(app_a)) & set(before)

        # every operation with tenant a's credentials on tenant b's prefix or schema
        broker = cross.broker
        fence = Claim(b_queued.id, uuid.uuid4().hex)
        stray = tally.attempt("send", lambda: cross.get_task("sec.ok").send(9, "x").id)
        tally.attempt("claim (a worker run)", lambda: cross.run_until_idle())
        if kind != "nats":  # (on NATS it would run on tenant a's account, as the line above)
            process = "claim (a `taskmill worker` process)"
            url = tenants.cross_url
            tally.attempt(process, lambda: _worker_refused(url, worker, tally.texts))
        claim = broker.claim(["default"], 10, "w-s9", 30.0)
        tally.attempt("claim (the broker's call)", lambda: cross.run_sync(claim))
        finish = broker.finish([Finish(fence, Succeeded(b"1"))])
        tally.attempt("finish (ack)", lambda: cross.run_sync(finish))
        tally.attempt("retry (nack a failed job)", lambda: cross.retry_jobs([b_failed.id]))
        tally.attempt("cancel", lambda: cross.cancel_job(b_queued.id))
        tally.attempt("run now", lambda: cross.run_job_now(b_delayed.id))
        tally.attempt("get (peek)", lambda: cross.get_job(b_done.id))
        tally.attempt("list", lambda: cross.list_jobs())
        tally.attempt("list failed (DLQ read)", lambda: cross.list_jobs(state="failed"))
        tally.attempt("stats", lambda: cross.stats())
        tally.attempt("delete a finished job", lambda: cross.delete_jobs([b_done.id]))
        tally.attempt("purge", lambda: cross.purge("default"))
        # the API answers 503 without the broker's words (they go to its log: checked below)
        tally.attempt("HTTP API job list", lambda: _api_jobs(cross), "HTTP 503")

        after = _snapshot(app_b)
        assert after == before, (before, after)
        if stray is not None:  # NATS: the job went to tenant a's account, not b's
            with pytest.raises(JobNotFoundError):
                app_b.get_job(stray)
    finally:
        for app in (cross, app_a, app_b):
            app.close()

    lines = "\n".join(f"  {o.op}: {o.verdict} in {o.seconds:.2f} s ({o.detail})"
                      for o in tally.outcomes)  # fmt: skip
    kept = ("refused", "not found", "own account")
    allowed = [o for o in tally.outcomes if o.verdict not in kept]
    assert not allowed, f"cross-tenant operations not denied:\n{lines}"
    slow = [o for o in tally.outcomes if o.seconds > 10]
    assert not slow, f"slow refusals:\n{lines}"
    texts = tally.texts + [
        f"{r.getMessage()} {r.__dict__} {r.exc_text or ''}" for r in caplog.records
    ]
    if any(o.op == "HTTP API job list" and o.verdict == "refused" for o in tally.outcomes):
        web = [r.getMessage() for r in caplog.records if r.name.startswith("taskmill.web")]
        assert any(w.lower() in m.lower() for m in web for w in REFUSALS[kind]), web
    leaked = [t for t in texts for pw in tenants.passwords if pw in t]
    assert not leaked, leaked
    refused, unseen, own = (tally.count(v) for v in kept)
    n = len(tally.outcomes)
    summary = (f"{refused + unseen}/{n} denied ({refused} refused by the broker, {unseen} found "
               "nothing)")  # fmt: skip
    if kind == "nats":  # accounts: nothing can name the other account, so nothing is refused
        summary = (f"{n}/{n} kept from tenant b: {refused} refused, {unseen} found nothing, "
                   f"{own} ran on tenant a's own account")  # fmt: skip
    print(
        f"S9 {kind}: {summary}; b's {len(before)} jobs unchanged, 0 passwords in "
        f"{len(texts)} texts, {time.monotonic() - started:.1f} s\n{lines}"
    )


@pytest.mark.parametrize("tenants", ["postgres"], indirect=True)
def test_s9_postgres_wake_channel_is_not_private(tenants: Tenants) -> None:
    """What PostgreSQL cannot refuse: any role that may connect to the database may
    ``LISTEN`` on, and ``NOTIFY``, any channel, tenant b's ``tb_wake`` included. Tenant a's
    role hears b's wake-ups (their payload: a queue's name, or a delay in seconds and a queue)
    and can send b's workers spurious ones (an empty claim each). Pinned here so that
    docs/reliability.md (S9) stays true; no job data travels on the channel."""
    conninfo = tenants.cross_url.split("?", 1)[0]
    app_b = build(tenants.urls["b"])
    try:
        app_b.get_task("sec.ok").send(1, "x")  # creates b's schema's tables, wakes nobody yet
        with psycopg.connect(conninfo, autocommit=True, connect_timeout=5) as conn:
            conn.execute("LISTEN tb_wake")
            app_b.get_task("sec.ok").send(2, "x")
            app_b.get_task("sec.ok").options(delay=60).send(3, "x")
            heard = [n.payload for n in conn.notifies(timeout=10, stop_after=2)]
            conn.execute("SELECT pg_notify('tb_wake', 'qdefault')")  # no refusal either
    finally:
        app_b.close()
    assert heard[0] == "qdefault" and heard[1].startswith("s") and heard[1].endswith(" default")
    assert not any(pw in " ".join(heard) for pw in tenants.passwords)
    print(f"S9 postgres side channel: tenant a's role heard b's wake-ups {heard} and sent one")
