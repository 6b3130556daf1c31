"""Redis-specific behaviour that the conformance suite cannot show: connections killed under a
worker, keys that expire, two apps sharing one server under different prefixes, and producers
whose Redis is down or hung. (A server restarted mid-run: ``test_server_restart.py``.)

Servers are real (``tests/servers.py``): the session's shared one under a key prefix per test,
or a test's own (``redis_server_aof``) when the test stops, kills or freezes it. Workers are
real ``taskmill worker`` processes or ``running_worker`` threads. Waiting is polling until a
deadline; the only sleeps are an outage's length and a producer's pacing.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from servers import RedisServer
from taskmill import App, BrokerUnavailableError, JobNotFoundError, JobState, current_job
from taskmill.testing import running_worker, wait_until

from .redis_app import SETTINGS, work
from .support import (
    Workers,
    all_jobs,
    run_at_once,
    wait_registered,
)

BOUNDED_WAIT_S = 10.0
"""A producer facing an unreachable Redis must hear so within this long."""
RESUME_S = 5.0
"""A worker whose connections were killed must run a new job within this long."""


def unique_prefix(tag: str) -> str:
    return f"{tag}{uuid.uuid4().hex[:10]}:"


def url_of(server: RedisServer, prefix: str) -> str:
    return f"{server.url}?prefix={prefix}"


def make_app(url: str, **settings: Any) -> App:
    """An app with the ``work`` task of ``redis_app`` (what the worker processes load)."""
    app = App(url, **{**SETTINGS, **settings})
    app.task(name="work", retries=5, backoff=0.05)(work)
    return app


def keys_under(client: redis.Redis, prefix: str) -> list[str]:
    return sorted(k.decode() for k in client.scan_iter(match=f"{prefix}*", count=1000))


def delete_prefix(client: redis.Redis, prefix: str) -> None:
    keys = keys_under(client, prefix)
    for start in range(0, len(keys), 1000):
        client.unlink(*keys[start : start + 1000])


_SIZE = {"hash": "HLEN", "zset": "ZCARD", "set": "SCARD", "list": "LLEN", "stream": "XLEN"}


def persistent_keys(client: redis.Redis, prefix: str) -> dict[str, tuple[str, int]]:
    """Keys under ``prefix`` without a TTL: name (prefix removed) -> (type, element count)."""
    out = {}
    for key in keys_under(client, prefix):
        if client.ttl(key) != -1:  # -2: gone meanwhile; >= 0: will expire
            continue
        kind = client.type(key).decode()
        size = int(client.execute_command(_SIZE[kind], key)) if kind in _SIZE else 1
        out[key[len(prefix) :]] = (kind, size)
    return out


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    w = Workers(tmp_path, "redis_app:app")
    try:
        yield w
    finally:
        w.close()


# --- (a) connections killed under a worker --------------------------------------------------------


def blocked_client(admin: redis.Redis) -> dict[str, Any] | None:
    """A client blocked in a blocking read (flag ``b``), i.e. an idle worker waiting."""
    return next((c for c in admin.client_list() if "b" in c["flags"]), None)


def kill_clients(admin: redis.Redis, how: str) -> int:
    if how == "type":  # CLIENT KILL TYPE normal (and pubsub), sparing this connection
        return int(admin.client_kill_filter(_type="normal", skipme=True)) + int(
            admin.client_kill_filter(_type="pubsub", skipme=True)
        )
    me = admin.client_id()
    killed = 0
    for c in admin.client_list():
        if int(c["id"]) != me:
            killed += int(admin.client_kill_filter(_id=c["id"]))
    return killed


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["type", "id"])
def test_worker_resumes_within_5s_after_client_kill(
    redis_server_aof: RedisServer, workers: Workers, how: str
) -> None:
    """Three times: wait until the idle worker is blocked waiting for work, kill every client
    connection (``CLIENT KILL TYPE normal`` / ``CLIENT KILL ID`` each), send a job: its result
    arrives within 5 s, from the same worker process."""
    url = url_of(redis_server_aof, "kill:")
    app = make_app(url)
    task = app.tasks["work"]
    admin = redis_server_aof.client()
    try:
        proc = workers.start(url, "--concurrency", "4")
        wait_registered(app, proc, workers)
        assert task.send(0).result(timeout=10) == 0
        for round_ in range(1, 4):
            wait_until(
                lambda: blocked_client(admin),
                what="the idle worker to block waiting for work (no client has flag b: is it "
                f"polling?) clients: {admin.client_list()}",
                timeout=15,
            )
            assert kill_clients(admin, how) >= 1
            started = time.monotonic()
            handle = task.send(round_)
            try:
                assert handle.result(timeout=RESUME_S) == round_
            except TimeoutError:
                raise AssertionError(
                    f"round {round_}: no result {RESUME_S} s after CLIENT KILL ({how}); "
                    f"job: {app.get_job(handle.id)}\nworker output:\n{workers.output()[-5000:]}"
                ) from None
            elapsed = time.monotonic() - started
            assert elapsed < RESUME_S, f"round {round_}: {elapsed:.2f} s"
            assert proc.poll() is None, f"the worker exited:\n{workers.output()}"
    finally:
        admin.close()
        app.close()


# --- (b) keys expire ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_pending_jobs_never_expire_and_finished_ones_do(redis_server: RedisServer) -> None:
    prefix = unique_prefix("ttl")
    app = make_app(url_of(redis_server, prefix), result_ttl_s=30.0)
    task = app.tasks["work"]
    admin = redis_server.client()
    try:
        queued = task.send(1)
        scheduled = task.options(delay=3600).send(2)
        keyed = task.options(key="k").send(3)
        for handle in (queued, scheduled, keyed):
            assert admin.ttl(f"{prefix}job:{handle.id}") == -1, "a pending job would expire"
        assert set(persistent_keys(admin, prefix)) >= {f"job:{queued.id}", f"job:{keyed.id}"}
        with running_worker(app):
            assert queued.result(timeout=10) == 1
            assert keyed.result(timeout=10) == 3
        for handle in (queued, keyed):
            ttl = admin.ttl(f"{prefix}job:{handle.id}")
            assert 0 < ttl <= 30, f"finished job {handle.id}: TTL {ttl}, want result_ttl_s (30)"
        assert admin.ttl(f"{prefix}job:{scheduled.id}") == -1
    finally:
        delete_prefix(admin, prefix)
        admin.close()
        app.close()


@pytest.mark.timeout(30)
def test_sends_to_a_server_that_forgot_the_scripts_load_them_again(
    redis_server: RedisServer,
) -> None:
    """A restarted or flushed server answers NOSCRIPT: a blocking send() (its command packed
    once, sent again after the load) and a send_many() load the script again, and each job is
    stored once."""
    prefix = unique_prefix("noscript")
    app = make_app(url_of(redis_server, prefix))
    task = app.tasks["work"]
    admin = redis_server.client()
    try:
        first = task.send(1)
        admin.script_flush()
        second = task.send(2)
        admin.script_flush()
        rest = task.send_many([(3,), (4,)])
        with running_worker(app):
            assert [h.result(timeout=10) for h in (first, second, *rest)] == [1, 2, 3, 4]
        assert len(all_jobs(app)) == 4
    finally:
        delete_prefix(admin, prefix)
        admin.close()
        app.close()


@pytest.mark.timeout(120)
def test_no_key_without_ttl_grows_with_the_number_of_jobs(redis_server: RedisServer) -> None:
    """Run 50 jobs, then 500 (half with unique keys), with a tiny ``result_ttl_s``: once they
    are done, no job hash is left, and the keys without a TTL are a few fixed ones (none named
    after a job or a unique key), no bigger after 500 jobs than after 50 (a stream, trimmed
    approximately, stays under a bound)."""
    prefix = unique_prefix("soak")
    app = App(
        url_of(redis_server, prefix), **{**SETTINGS, "result_ttl_s": 0.3, "prune_interval_s": 0.2}
    )
    ran: set[str] = set()
    lock = threading.Lock()

    @app.task(name="record")
    def record(n: int) -> int:
        with lock:
            ran.add(current_job().id)
        return n

    admin = redis_server.client()
    sent: set[str] = set()  # job ids and unique keys: no persistent key may be named after one

    def run(count: int) -> dict[str, tuple[str, int]]:
        half = count // 2
        ids = [h.id for h in record.send_many([(i,) for i in range(half)])]
        keys = {i: f"unique-{count}-{i}" for i in range(half, count)}
        ids += [record.options(key=k).send(i).id for i, k in keys.items()]
        sent.update(ids, keys.values())
        wait_until(lambda: ran >= set(ids), what=f"{count} jobs to run", timeout=60)

        def settled() -> dict[str, tuple[str, int]] | None:
            if any(k.startswith(f"{prefix}job:") for k in keys_under(admin, prefix)):
                return None
            return persistent_keys(admin, prefix) or {"(none)": ("", 0)}

        return wait_until(
            settled,
            what=lambda: (
                f"the job hashes of {count} finished jobs to expire; left: "
                f"{len([k for k in keys_under(admin, prefix) if k.startswith(prefix + 'job:')])}"
            ),
            timeout=30,
        )

    try:
        with running_worker(app, concurrency=16):
            after_50 = run(50)
            after_500 = run(500)
        detail = f"after 50 jobs: {after_50}\nafter 500 jobs: {after_500}"
        assert len(after_500) <= 15, f"too many keys without a TTL\n{detail}"
        for key, (kind, size) in after_500.items():
            assert not any(part in key for part in sent), f"{key} names a job\n{detail}"
            if kind == "stream":  # trimmed approximately (whole nodes): bounded, not exact
                assert size <= 250, f"stream {key} is not trimmed ({size})\n{detail}"
            elif key.endswith(":wake"):  # a queue's wake tokens: trimmed to 64 (_common.lua)
                # (how many are left depends on how often workers were idle when jobs came:
                # 26 after 500 jobs on a slow run, none on most)
                assert size <= 64, f"{key} is not trimmed ({size})\n{detail}"
            else:
                grew = size - after_50.get(key, (kind, 0))[1]
                assert grew <= 10, f"{key} grew by {grew} from 50 jobs to 500\n{detail}"
    finally:
        delete_prefix(admin, prefix)
        admin.close()
        app.close()


# --- (c) two prefixes on one server ---------------------------------------------------------------


@pytest.mark.timeout(60)
def test_apps_with_different_prefixes_do_not_see_each_others_jobs(
    redis_server: RedisServer,
) -> None:
    """Same server, same task name, same queue, same unique key: only the prefix differs."""
    prefixes = {"a": unique_prefix("a"), "b": unique_prefix("b")}
    ran: dict[str, list[str]] = {"a": [], "b": []}
    apps: dict[str, App] = {}
    for tag, prefix in prefixes.items():
        app = App(url_of(redis_server, prefix), **SETTINGS)

        def run(n: int, _tag: str = tag) -> int:
            ran[_tag].append(current_job().id)
            return n

        app.task(name="work")(run)
        apps[tag] = app
    a, b = apps["a"], apps["b"]
    admin = redis_server.client()
    try:
        ids = {
            "a": [h.id for h in a.tasks["work"].send_many([(i,) for i in range(10)])],
            "b": [h.id for h in b.tasks["work"].send_many([(i,) for i in range(15)])],
        }
        for tag, app in apps.items():
            handle = app.tasks["work"].options(key="shared-key").send(100)
            assert not handle.existing, f"{tag}: the other prefix's unique key matched"
            ids[tag].append(handle.id)

        for tag, app in apps.items():
            assert set(all_jobs(app)) == set(ids[tag]), tag
            (stats,) = app.run_sync(app.broker.stats())
            assert stats.counts["queued"] == len(ids[tag]), (tag, stats)
        with pytest.raises(JobNotFoundError):
            a.get_job(ids["b"][0])
        with pytest.raises(JobNotFoundError):
            a.job(ids["b"][0]).cancel()
        assert b.get_job(ids["b"][0]).state is JobState.QUEUED

        with running_worker(a) as worker_a:
            wait_until(lambda: set(ran["a"]) >= set(ids["a"]), what="a's jobs to run", timeout=20)
            assert [w.id for w in a.run_sync(a.broker.list_workers())] == [worker_a.id]
            assert a.run_sync(b.broker.list_workers()) == []
            # a's worker claims again after b's jobs were there all along: it never takes them
            extra = a.tasks["work"].send(-1)
            assert extra.result(timeout=10) == -1
        assert not set(ran["a"]) & set(ids["b"])
        assert ran["b"] == []
        b_jobs = all_jobs(b)
        assert {j.state for j in b_jobs.values()} == {JobState.QUEUED}, b_jobs

        # management is per prefix too: pausing and purging a's queue leaves b's alone
        a.run_sync(a.broker.pause("default", True))
        a.tasks["work"].send_many([(i,) for i in range(5)])
        assert a.run_sync(a.broker.purge("default")) == 5
        assert len(all_jobs(b, JobState.QUEUED)) == len(ids["b"])
        with running_worker(b):
            wait_until(lambda: set(ran["b"]) >= set(ids["b"]), what="b's jobs to run", timeout=20)
        assert not set(ran["b"]) & set(ids["a"])
    finally:
        for prefix in prefixes.values():
            delete_prefix(admin, prefix)
        admin.close()
        for app in apps.values():
            app.close()


# --- (d) a producer whose Redis is unreachable ----------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("outage", ["stopped", "frozen"])
def test_producer_gets_broker_unavailable_after_a_bounded_wait(
    redis_server_aof: RedisServer, outage: str
) -> None:
    """Redis stopped (connections refused) or frozen (SIGSTOP: connections hang): ``send``,
    ``send_many``, ``asend`` and a new app's first ``send`` each raise
    ``BrokerUnavailableError`` within 10 s. Every job acknowledged before is still there once
    Redis is back, the same producer sends again, and a worker runs them all."""
    url = url_of(redis_server_aof, "down:")
    app = make_app(url)
    fresh = make_app(url)  # never connected before the outage
    task = app.tasks["work"]
    acked = [task.send(i).id for i in range(5)]
    acked += [h.id for h in task.send_many([(i,) for i in range(5, 10)])]
    attempts: dict[str, Callable[[], object]] = {
        "send": lambda: task.send(100),
        "send_many": lambda: task.send_many([(101,), (102,)]),
        "asend": lambda: app.run_sync(task.asend(103)),
        "new app's send": lambda: fresh.tasks["work"].send(104),
    }
    try:
        if outage == "stopped":
            redis_server_aof.stop()
        else:
            redis_server_aof.freeze()
        try:
            outcomes = run_at_once(attempts, limit=BOUNDED_WAIT_S + 10)
            report = {name: f"{exc!r} after {s:.2f} s" for name, (exc, s) in outcomes.items()}
            for name, (exc, elapsed) in outcomes.items():
                assert isinstance(exc, BrokerUnavailableError), f"{name}: {report}"
                assert elapsed < BOUNDED_WAIT_S, f"{name} took too long: {report}"
                if name == "send":  # it may have reached the server: the caller is told so
                    assert "A write that was under way may still have been applied" in str(exc)
        finally:
            if outage == "stopped":
                redis_server_aof.start()
            else:
                redis_server_aof.thaw()

        stored = set(all_jobs(app))
        assert set(acked) <= stored, f"acknowledged jobs lost: {set(acked) - stored}"
        if outage == "stopped":  # nothing reached the server: nothing else was stored
            assert stored == set(acked)
        # a frozen server still runs the commands it had received: at most the 5 jobs tried
        assert len(stored - set(acked)) <= 5
        again = task.send(200)
        with running_worker(app):
            assert again.result(timeout=10) == 200
            for job_id in acked:
                app.job(job_id).result(timeout=10)
    finally:
        fresh.close()
        app.close()
