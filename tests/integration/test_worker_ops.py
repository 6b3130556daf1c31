"""Running workers in production, with real ``taskmill worker`` processes: the liveness endpoint
(``--health-port``) and ``taskmill ping``, worker names, pools of worker processes on their own
queues under one supervisor (``--pool-spec``), a start while the broker is unreachable (retried,
the same with one process or many), a start that cannot succeed (exit 3, not restarted), and
what the logs say.

Waiting is polling until a deadline; a stopped process (SIGSTOP) stands in for a hung worker.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from servers import RedisServer, free_port
from taskmill import App
from taskmill.testing import wait_until

from .redis_app import SETTINGS
from .support import Workers, all_jobs
from .test_cli import Cli, alive_workers, one_error_line, stop, wait_state

STAMP = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} "
"""How every log line of a worker process starts (LOG_FORMAT's asctime)."""


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Cli]:
    c = Cli(tmp_path)
    try:
        yield c
    finally:
        c.close()


def health(port: int) -> tuple[int, dict[str, Any]] | None:
    """(status code, JSON body) of the liveness endpoint; None while nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def wait_health(
    port: int, code: int, what: str, timeout: float = 20.0, heartbeats: bool = False
) -> dict[str, Any]:
    """Until the endpoint answers ``code``; with ``heartbeats``, also until every worker it
    answers for heartbeated (not only started: ``"starting"`` is healthy too)."""

    def check() -> dict[str, Any] | None:
        got = health(port)
        if got is None or got[0] != code:
            return None
        statuses = [p["status"] for p in got[1].get("processes", [got[1]])]
        return got[1] if not heartbeats or set(statuses) == {"ok"} else None

    return wait_until(check, what=f"{what} (HTTP {code} on port {port})", timeout=timeout)


def lines(output: str, pattern: str) -> list[str]:
    return [line for line in output.splitlines() if re.search(pattern, line)]


def pools_of(cli: Cli, n: int) -> list[dict[str, Any]]:
    def check() -> list[dict[str, Any]] | None:
        found = alive_workers(cli)
        return found if len(found) == n else None

    return wait_until(check, what=f"{n} registered workers", timeout=30)


# --- liveness: --health-port --------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_health_endpoint_answers_503_while_the_workers_loop_is_blocked(cli: Cli) -> None:
    port = free_port()
    # --pool async runs the sync `block` task on the event loop: no heartbeat while it runs
    worker = cli.spawn("worker", "--pool", "async", "--health-port", str(port), "--name", "solo")
    started = wait_health(port, 200, "the worker to be healthy from its start")
    assert started["status"] in ("starting", "ok")
    body = wait_health(port, 200, "the worker's first heartbeat", heartbeats=True)
    assert body["status"] == "ok" and body["worker"].startswith("solo@")
    assert body["max_age_s"] == 1.5  # three heartbeats of cliapp's 0.5 s

    release = cli.tmp_path / "release"
    job = cli.send("block", json.dumps([str(release)]))
    wait_state(cli, job, "running")
    stale = wait_health(port, 503, "the blocked worker to be reported stale")
    assert stale["status"] == "stale" and stale["heartbeat_age_s"] > 1.5
    release.touch()
    wait_health(port, 200, "the worker to be healthy again")
    assert wait_state(cli, job, "succeeded")["result"] == "released"

    reply = subprocess.run(  # HEAD: the status alone
        ["curl", "-sI", f"http://127.0.0.1:{port}/"], capture_output=True, text=True, timeout=10
    )
    assert reply.stdout.startswith("HTTP/1.0 200 OK"), reply.stdout
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=20) == 0, cli.output()


@pytest.mark.timeout(90)
def test_supervisor_health_answers_for_every_child(cli: Cli) -> None:
    port = free_port()
    supervisor = cli.spawn("worker", "-p", "2", "--health-port", str(port), name="supervisor")
    body = wait_health(port, 200, "both children to heartbeat", heartbeats=True)
    assert [p["status"] for p in body["processes"]] == ["ok", "ok"]
    children = {w["pid"] for w in pools_of(cli, 2)}
    assert {p["pid"] for p in body["processes"]} == children

    hung, other = sorted(children)
    os.kill(hung, signal.SIGSTOP)
    try:

        def reported() -> dict[str, Any] | None:
            got = health(port)
            if got is None or got[0] != 503:
                return None
            by_pid = {p["pid"]: p["status"] for p in got[1]["processes"]}
            return got[1] if by_pid == {hung: "stale", other: "ok"} else None

        stale = wait_until(
            reported, what="503 naming the stopped child (and only it) stale", timeout=20
        )
        assert stale["status"] == "unhealthy"
    finally:
        os.kill(hung, signal.SIGCONT)
    wait_health(port, 200, "the resumed child to be healthy again")
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=30) == 0, cli.output()


def test_a_taken_health_port_is_a_clear_error(cli: Cli) -> None:
    port = free_port()
    first = cli.spawn("worker", "--health-port", str(port))
    wait_health(port, 200, "the first worker")
    r = cli.run("worker", "--health-port", str(port))
    assert r.returncode == 1
    assert f"--health-port: cannot listen on 127.0.0.1:{port}" in r.stderr, r.stderr
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=20) == 0


# --- taskmill ping and --name ---------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_ping_exits_0_only_while_the_named_worker_heartbeats(cli: Cli) -> None:
    r = cli.run("ping", "--name", "pinger")
    assert r.returncode == 1
    assert one_error_line(r) == "error: no worker named pinger is registered"

    worker = cli.spawn("worker", "--name", "pinger")
    (w,) = wait_until(lambda: alive_workers(cli) or None, what="the worker to register", timeout=20)
    assert w["name"] == "pinger" and w["id"].startswith("pinger@")
    assert w["id"] in cli.ok("workers")  # the table's id column carries the name

    out = cli.ok("ping", "--name", "pinger")
    assert out.startswith(f"ok: 1 of 1 worker(s) named pinger alive; {w['id']} heartbeated")
    assert cli.ok("ping", "--id", w["id"]).startswith("ok: 1 of 1 worker(s) with id")
    assert cli.ok("ping").startswith("ok: 1 of 1 worker(s) alive")
    r = cli.run("ping", "--name", "other")
    assert r.returncode == 1 and "no worker named other is registered" in one_error_line(r)

    os.kill(worker.pid, signal.SIGSTOP)
    try:

        def stale() -> str | None:
            r = cli.run("ping", "--name", "pinger", "--max-age", "1")
            return r.stderr if r.returncode == 1 else None

        reason = wait_until(stale, what="ping to fail for the stopped worker", timeout=20)
        assert "no worker named pinger heartbeated in the last 1.0s" in reason
        assert w["id"] in reason
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    wait_until(
        lambda: cli.run("ping", "--name", "pinger").returncode == 0 or None,
        what="ping to succeed for the resumed worker",
        timeout=20,
    )
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=20) == 0, cli.output()
    r = cli.run("ping", "--name", "pinger")
    assert r.returncode == 1, "a worker that signed off is not alive"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--name", "a", "--id", "b"], "give --name or --id, not both"),
        (["--name", "two words"], "invalid worker name 'two words'"),
    ],
)
def test_ping_usage_errors(cli: Cli, args: list[str], message: str) -> None:
    r = cli.run("ping", *args)
    assert r.returncode == 2 and message in one_error_line(r)


def test_worker_name_is_checked(cli: Cli) -> None:
    r = cli.run("worker", "--name", "a@b")
    assert r.returncode == 2 and "invalid worker name 'a@b'" in one_error_line(r)


# --- pools under one supervisor: --pool-spec ------------------------------------------------------


@pytest.mark.timeout(120)
def test_pool_specs_run_each_pool_on_its_queues_and_restart_a_killed_child(cli: Cli) -> None:
    supervisor = cli.spawn(
        "worker", "--pool-spec", "urgent:1", "--pool-spec", "default:2:3", "-c", "5",
        "--name", "fleet", name="supervisor",
    )  # fmt: skip
    first = pools_of(cli, 3)
    shape = sorted((w["queues"], w["concurrency"], w["name"]) for w in first)
    assert shape == [(["default"], 3, "fleet"), (["default"], 3, "fleet"), (["urgent"], 5, "fleet")]
    pool_of = {w["id"]: w["queues"][0] for w in first}

    urgent_job = cli.send("steps", "[2]")  # the `steps` task's queue is urgent
    default_job = cli.send("add", "[1, 2]")
    assert pool_of[wait_state(cli, urgent_job, "succeeded")["worker_id"]] == "urgent"
    assert pool_of[wait_state(cli, default_job, "succeeded")["worker_id"]] == "default"

    victim = next(w for w in first if w["queues"] == ["default"])
    os.kill(victim["pid"], signal.SIGKILL)

    def replaced() -> list[dict[str, Any]] | None:
        found = alive_workers(cli)
        if len(found) != 3 or victim["pid"] in {w["pid"] for w in found}:
            return None
        return found

    after = wait_until(replaced, what="the killed child to be replaced", timeout=30)
    assert sorted((w["queues"], w["concurrency"]) for w in after) == [
        (["default"], 3),
        (["default"], 3),
        (["urgent"], 5),
    ]
    assert "(killed by SIGKILL); restarting in" in cli.output()
    assert supervisor.poll() is None

    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=30) == 0, cli.output()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("render", "'render': expected QUEUES:PROCESSES[:CONCURRENCY]"),
        ("render:2:4:8", "expected QUEUES:PROCESSES[:CONCURRENCY]"),
        (":2", "':2': name at least one queue before the first ':'"),
        ("render:two", "PROCESSES must be a whole number >= 1, not 'two'"),
        ("render:0", "PROCESSES must be a whole number >= 1, not '0'"),
        ("render:2:-1", "CONCURRENCY must be a whole number >= 1, not '-1'"),
    ],
)
def test_bad_pool_specs_are_usage_errors(cli: Cli, spec: str, message: str) -> None:
    r = cli.run("worker", "--pool-spec", "urgent:1", "--pool-spec", spec)
    assert r.returncode == 2
    line = one_error_line(r)
    assert "'--pool-spec'" in line and message in line, line


@pytest.mark.parametrize("other", [["-q", "urgent"], ["-p", "2"]])
def test_pool_specs_replace_queues_and_processes(cli: Cli, other: list[str]) -> None:
    r = cli.run("worker", "--pool-spec", "urgent:1", *other)
    assert r.returncode == 2
    assert f"--pool-spec sets each pool's queues and processes: drop {other[0]}" in (
        one_error_line(r)
    )


# --- --lease: a worker's own lease ---------------------------------------------------------------


def lease_left(cli: Cli, job_id: str) -> float:
    """Seconds until the running job's lease expires, as stored."""
    with App(cli.url) as app:
        job = all_jobs(app)[job_id]
    assert job.lease_expires_at is not None
    return job.lease_expires_at - time.time()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("processes", ["1", "2"])
def test_a_killed_workers_job_runs_again_within_its_lease(cli: Cli, processes: str) -> None:
    """cliapp's App keeps the default 30 s lease; ``--lease 2`` (reaching -p N's children too)
    brings the job of a SIGKILLed worker back within seconds."""
    killed = cli.spawn("worker", "--lease", "2", "-p", processes, name="killed")
    release = cli.tmp_path / "release"
    job = cli.send("block", json.dumps([str(release)]))
    wait_state(cli, job, "running")
    assert 0 < lease_left(cli, job) <= 2.0  # the claim's lease is the worker's, not 30 s
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait(timeout=10)
    release.touch()
    rescuer = cli.spawn("worker", "--lease", "2", name="rescuer")
    done = wait_state(cli, job, "succeeded", timeout=20)  # 30 s leases would not make it
    assert done["result"] == "released" and done["lost_leases"] == 1
    assert stop(rescuer) == 0, cli.output()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--lease", "0.5"],  # cliapp sets heartbeat_s=0.5
            "Invalid value for '--lease': 0.5 s is not longer than the app's heartbeat_s "
            "(0.5 s): a claim must outlast the heartbeats that renew it",
        ),
        (["--lease", "0", "-p", "2"], "Invalid value for '--lease': 0.0 is not in the range x>0"),
        (["--lease", "soon"], "Invalid value for '--lease': 'soon' is not a valid float"),
    ],
)
def test_a_lease_the_settings_refuse_is_a_usage_error(
    cli: Cli, args: list[str], message: str
) -> None:
    r = cli.run("worker", *args)
    assert r.returncode == 2 and message in one_error_line(r)


# --- the start: an unreachable broker is retried; a broken one is not -----------------------------


@pytest.fixture
def redis_workers(tmp_path: Path) -> Iterator[Workers]:
    w = Workers(tmp_path, "redis_app:app")
    try:
        yield w
    finally:
        w.close()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("processes", [1, 2])
def test_a_worker_started_before_redis_retries_then_runs_jobs(
    tmp_path: Path, redis_workers: Workers, processes: int
) -> None:
    port = free_port()  # nothing listens here yet
    url = f"redis://127.0.0.1:{port}/0?unavailable_after_s=0.5"
    proc = redis_workers.start(url, "-p", str(processes), "-c", "2")

    def retried() -> list[str] | None:
        assert proc.poll() is None, f"the worker exited:\n{redis_workers.output()}"
        found = lines(redis_workers.output(), r"cannot reach the broker at start, retrying in")
        pids = {line.split("[", 1)[1].split("]", 1)[0] for line in found}
        return found if len(pids) == processes else None

    warned = wait_until(retried, what="every worker process to warn that it retries", timeout=20)
    for line in warned:
        assert re.search(STAMP + rf"WARNING .* retrying in \d+\.\d s: Redis at \S*:{port}", line)

    server = RedisServer(tmp_path / "redis", port=port)
    server.start()
    try:
        app = App(url, **SETTINGS)
        work = app.task(name="work", retries=5, backoff=0.05)(lambda n, pause_s=0.0: n)
        try:
            assert work.send(7).result(timeout=30) == 7
        finally:
            app.close()
        assert proc.poll() is None
        assert "died unexpectedly" not in redis_workers.output()  # retried, not restarted
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, redis_workers.output()
    finally:
        server.kill()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("processes", [1, 2])
def test_max_start_wait_gives_up_with_exit_code_3(redis_workers: Workers, processes: int) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0?unavailable_after_s=0.3"
    proc = redis_workers.start(url, "-p", str(processes), "--max-start-wait", "1")
    assert proc.wait(timeout=30) == 3, redis_workers.output()
    out = redis_workers.output()
    gave_up = lines(out, r"cannot start: gave up reaching the broker after 1 s")
    assert gave_up and all(re.search(STAMP + "ERROR ", line) for line in gave_up), out
    assert "died unexpectedly" not in out


@pytest.mark.timeout(60)
def test_a_broken_broker_url_stops_the_supervisor_with_timestamped_errors(cli: Cli) -> None:
    env = {**cli.env, "TASKMILL_URL": cli.url + "?no_such_option=1"}
    proc = subprocess.run(
        [sys.executable, "-m", "taskmill", "worker", "-p", "2"],
        capture_output=True, text=True, env=env, cwd=cli.tmp_path, timeout=40,
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    # the other child may be stopped before it gets as far: at least one says why
    errors = lines(proc.stderr, "unknown sqlite URL option")
    assert errors, proc.stderr
    assert all(
        re.search(STAMP + r"ERROR .*cannot start: unknown sqlite URL option", e) for e in errors
    )
    assert "not restarting it, stopping the others" in proc.stderr
    assert "died unexpectedly" not in proc.stderr


# --- the logs -------------------------------------------------------------------------------------


def test_the_default_queue_list_is_logged(cli: Cli) -> None:
    worker = cli.spawn("worker")
    wait_until(lambda: alive_workers(cli) or None, what="the worker to register", timeout=20)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=20) == 0
    (line,) = lines(cli.output(), r"queues: ")
    assert line.endswith(
        "queues: default,urgent (every queue the app's tasks use, and the app's default queue "
        "'default'; -q chooses)"
    )


@pytest.mark.timeout(60)
def test_a_sigterm_drain_is_logged_at_info(cli: Cli) -> None:
    supervisor = cli.spawn("worker", "-p", "2", name="supervisor")
    pools_of(cli, 2)
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=30) == 0, cli.output()
    # a normal shutdown is news, not a warning: the supervisor's line and each child's
    drains = lines(cli.output(), r"SIGTERM: draining")
    assert len(drains) == 3 and all(re.search(STAMP + "INFO ", d) for d in drains), drains
