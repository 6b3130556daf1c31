"""No output shows the broker password. Real servers that check one (a Redis ACL user, a
PostgreSQL role with scram-sha-256), a password that is a canary, and everything a user runs
with that URL: a supervised worker (``-p 2``) running a job, the scheduler, every command that
prints a URL or an error, a wrong password, a server that is down, a bad URL option, and the
Python objects' ``repr``. Every byte printed is searched for the canary.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from servers import PostgresServer, RedisServer, free_port
from taskmill import App, BrokerError
from taskmill.testing import wait_until

from .support import HERE

CANARY = "S3CRETcanary"


def _redis_url(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    server: RedisServer = request.getfixturevalue("redis_server")
    user = f"u{uuid.uuid4().hex[:8]}"
    with server.client() as client:
        client.execute_command("ACL", "SETUSER", user, "on", f">{CANARY}", "~*", "&*", "+@all")
    prefix = f"s{uuid.uuid4().hex[:10]}:"
    where = f"{server.host}:{server.port}/0"
    try:
        yield f"redis://{user}:{CANARY}@{where}?prefix={prefix}", where
    finally:
        with server.client() as client:
            client.execute_command("ACL", "DELUSER", user)
            keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
            if keys:
                client.unlink(*keys)


def _postgres_url(request: pytest.FixtureRequest, *, in_query: bool) -> tuple[str, str]:
    server: PostgresServer = request.getfixturevalue("postgres_server")
    role = f"u{uuid.uuid4().hex[:8]}"
    server.add_password_role(role, CANARY)
    database = f"d{uuid.uuid4().hex[:8]}"
    server.create_database(database)
    where = f"{server.host}:{server.port}/{database}"
    if in_query:  # libpq's other way to give it
        return f"postgresql://{role}@{where}?password={CANARY}", where
    return f"postgresql://{role}:{CANARY}@{where}", where


@pytest.fixture(params=["redis", "postgres", "postgres-password-option"])
def secret_url(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """(a URL whose password is the canary, the server's host:port/db)."""
    if request.param == "redis":
        yield from _redis_url(request)
    else:
        yield _postgres_url(request, in_query=request.param != "postgres")


class Outputs:
    """Runs ``python -m taskmill`` and keeps everything any run printed."""

    def __init__(self, tmp_path: Path, url: str) -> None:
        self.tmp_path = tmp_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("TASKMILL_")}
        env["TASKMILL_URL"] = url
        env["TASKMILL_APP"] = "cliapp:app"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        self.env = env
        self.printed: list[str] = []

    def run(self, *args: str, url: str | None = None) -> subprocess.CompletedProcess[str]:
        env = dict(self.env, TASKMILL_URL=url) if url is not None else self.env
        proc = subprocess.run(
            [sys.executable, "-m", "taskmill", *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=self.tmp_path,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        self.printed += [f"$ taskmill {' '.join(args)}\n", proc.stdout, proc.stderr]
        return proc

    def spawn(self, *args: str, name: str) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.tmp_path / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "taskmill", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.tmp_path,
                start_new_session=True,
            )
        return proc, log

    def stop(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            self.printed.append(log.read_text())

    def text(self) -> str:
        return "".join(self.printed)


@pytest.mark.timeout(120)
def test_no_output_shows_the_broker_password(tmp_path: Path, secret_url: tuple[str, str]) -> None:
    url, where = secret_url
    out = Outputs(tmp_path, url)

    # a supervised worker runs a job, then drains on SIGTERM
    worker, worker_log = out.spawn("worker", "-p", "2", "-c", "2", name="worker")
    try:
        wait_until(
            lambda: worker_log.read_text().count(" started: ") >= 2,
            what=lambda: f"both worker processes to start:\n{worker_log.read_text()}",
            timeout=60,
        )
        sent = out.run("enqueue", "add", "[20, 22]", "--wait", "--timeout", "30")
        assert sent.returncode == 0 and sent.stdout.splitlines()[-1] == "42", sent.stderr
    finally:
        out.stop(worker, worker_log)
    started = [line for line in worker_log.read_text().splitlines() if " started: " in line]
    assert len(started) == 2 and all("broker=" in line and "***" in line for line in started)

    # the scheduler logs its broker too
    scheduler, scheduler_log = out.spawn(
        "scheduler", "--app", "cliapp:scheduled", "--log-level", "info", name="scheduler"
    )
    try:
        wait_until(
            lambda: "scheduler started" in scheduler_log.read_text(),
            what=lambda: f"the scheduler to start:\n{scheduler_log.read_text()}",
            timeout=30,
        )
    finally:
        out.stop(scheduler, scheduler_log)

    # commands that print what the broker holds, or the URL
    for args in (("queues",), ("workers",), ("jobs", "list"), ("migrate",)):
        proc = out.run(*args)
        assert proc.returncode == 0, proc.stderr
    ignored = out.run("queues", "--url", "memory://")  # the app's URL wins, with a warning
    assert "warning: --url is ignored" in ignored.stderr and "***" in ignored.stderr

    # errors that name the URL or the server
    scheme = url.split(":", 1)[0]
    errors = {
        "wrong password": url.replace(CANARY, CANARY + "x"),
        "server down": f"{scheme}://u:{CANARY}@127.0.0.1:{free_port()}/0?unavailable_after_s=0.3",
        "bad option": f"{url}{'&' if '?' in url else '?'}unavailable_after_s=soon",
        "unknown scheme": url.replace(scheme, "amqp", 1),
    }
    for what, bad_url in errors.items():
        for args in (("queues",), ("enqueue", "add", "[1, 2]")):
            proc = out.run(*args, url=bad_url)
            assert proc.returncode != 0, f"{what}: {proc.stderr}"
            assert proc.stderr.startswith("error: "), f"{what}: {proc.stderr}"
        # a worker retries an unreachable broker at start: bounded here, and its lines are logs
        proc = out.run("worker", "--max-start-wait", "0.5", url=bad_url)
        assert proc.returncode != 0, f"{what}: {proc.stderr}"
        assert " ERROR " in proc.stderr, f"{what}: {proc.stderr}"

    # the Python objects
    app = App(url)
    try:
        app.open()
        out.printed += [repr(app), repr(app.broker)]
        assert "***" in repr(app)
    finally:
        app.close()
    bad = App(url.replace(CANARY, CANARY + "x"))
    try:
        with pytest.raises(BrokerError) as refused:
            bad.open()
        out.printed.append(str(refused.value))
        assert refused.value.permanent
    finally:
        bad.close()

    printed = out.text()
    assert where.split("/")[0] in printed  # the output is there, and names the server
    leaks = [line for line in printed.splitlines() if CANARY in line]
    assert not leaks, "the password was shown:\n" + "\n".join(leaks)
