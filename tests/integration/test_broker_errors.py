"""A URL that cannot work, as a new user meets it on the command line: a Redis URL at a port
where another kind of server answers, a database index the server refuses, a PostgreSQL URL at
a port that is not PostgreSQL's, a server that does not answer. Each is one line, ``error: …``,
naming the cause, a non-zero exit and no traceback, whatever the command; errors no retry can
fix come at once (no waiting out ``unavailable_after_s``), and a timeout of a command that only
reads does not talk of writes under way.

The servers are real: the session's redis-server and PostgreSQL, and a small TCP server started
here that answers every connection as an HTTP server would.
"""

from __future__ import annotations

import os
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from servers import PostgresServer, RedisServer, free_port
from taskmill import App, BrokerError, BrokerUnavailableError

from .support import HERE

PERMANENT_WITHIN_S = 3.0
"""An error no retry fixes is reported well before the 5 s a server gets to come back."""


class _HttpAnswer(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")


@pytest.fixture
def not_redis() -> Iterator[str]:
    """``host:port`` of a TCP server that answers every connection like an HTTP server."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _HttpAnswer)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="not-redis", daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield f"{host}:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def taskmill(
    tmp_path: Path, url: str, *args: str
) -> tuple[subprocess.CompletedProcess[str], float]:
    """``python -m taskmill ARGS`` with TASKMILL_URL set; the result and how long it took."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKMILL_")}
    env["TASKMILL_URL"] = url
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "taskmill", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    return proc, time.monotonic() - started


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The one line a failed command printed, checked to be all it printed, as ``error: …``.

    A worker logs instead (time-stamped, as every line of a worker process is) and exits 3
    (no restart fixes it): its one ERROR line is returned in the same ``error: …`` form."""
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout == ""
    if " taskmill." in proc.stderr:  # a worker's log lines
        assert proc.returncode == 3, f"rc={proc.returncode}\n{proc.stderr}"
        errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
        assert len(errors) == 1, f"expected one ERROR line, got {len(errors)}:\n{proc.stderr}"
        return "error: " + errors[0].split(" cannot start: ", 1)[1]
    assert proc.returncode == 1, f"rc={proc.returncode}\n{proc.stderr}"
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{proc.stderr}"
    assert lines[0].startswith("error: "), proc.stderr
    return lines[0]


# every kind of command: a read, a write, the worker (which loads an app)
COMMANDS = {
    "queues": ("queues",),
    "enqueue": ("enqueue", "add", "[1, 2]"),
    "jobs list": ("jobs", "list"),
    "worker": ("worker", "cliapp:app", "--log-level", "error"),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_redis_url_at_a_server_that_is_not_redis_is_one_line(
    tmp_path: Path, not_redis: str, command: str
) -> None:
    proc, took = taskmill(tmp_path, f"redis://{not_redis}/0", *COMMANDS[command])
    line = one_error_line(proc)
    assert line == (
        f"error: the server at {not_redis}/0 does not answer as Redis does (Protocol error, "
        'got "H" as reply type byte): is this the port of a Redis server?'
    )
    assert took < PERMANENT_WITHIN_S + 2  # interpreter start-up aside


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_database_index_the_redis_server_refuses_is_one_line(
    tmp_path: Path, redis_server: RedisServer, command: str
) -> None:
    where = f"{redis_server.host}:{redis_server.port}/999"
    proc, _ = taskmill(tmp_path, f"redis://{where}", *COMMANDS[command])
    assert one_error_line(proc) == (
        f"error: Redis at {where} refused the database the URL names (DB index is out of "
        "range); the server's `databases` setting (16 by default) bounds the index"
    )


def test_a_postgresql_url_at_a_server_that_is_not_postgresql_is_one_line_at_once(
    tmp_path: Path, not_redis: str
) -> None:
    proc, took = taskmill(tmp_path, f"postgresql://postgres@{not_redis}/x", "queues")
    line = one_error_line(proc)
    assert line.startswith(f"error: PostgreSQL at {not_redis}/x: "), line
    assert line.endswith("(is this the port of a PostgreSQL server?)"), line
    assert took < PERMANENT_WITHIN_S + 2


@pytest.mark.parametrize("kind", ["redis", "postgres"])
def test_permanent_errors_are_raised_at_once_by_sends_and_by_run_until_idle(
    not_redis: str, kind: str
) -> None:
    scheme = "redis" if kind == "redis" else "postgresql"
    app = App(f"{scheme}://{not_redis}/0")
    try:
        app.task(name="add")(lambda a, b: a + b)
        started = time.monotonic()
        with pytest.raises(BrokerError) as sent:
            app.tasks["add"].send(1, 2)
        with pytest.raises(BrokerError) as ran:
            app.run_until_idle()
        assert time.monotonic() - started < 2 * PERMANENT_WITHIN_S
    finally:
        app.close()
    for info in (sent, ran):
        assert info.value.permanent, info.value
        assert not isinstance(info.value, BrokerUnavailableError)


# --- a server that does not answer ---------------------------------------------------------------


def _nothing_listening(kind: str) -> str:
    port = free_port()
    if kind == "redis":
        return f"redis://127.0.0.1:{port}/0?unavailable_after_s=0.5"
    return f"postgresql://postgres@127.0.0.1:{port}/x?unavailable_after_s=0.5"


@pytest.mark.parametrize("kind", ["redis", "postgres"])
def test_a_read_that_times_out_does_not_speak_of_writes(tmp_path: Path, kind: str) -> None:
    url = _nothing_listening(kind)
    for args in (("queues",), ("jobs", "list"), ("workers",)):
        proc, _ = taskmill(tmp_path, url, *args)
        line = one_error_line(proc)
        assert "did not answer within 0.5 s" in line, line
        assert "write" not in line, line
    # (a send that may have been applied still says so: test_redis.py and test_postgres.py,
    # test_producer_gets_broker_unavailable_after_a_bounded_wait)


def test_the_redis_server_fixture_has_sixteen_databases(redis_server: RedisServer) -> None:
    """What the database index test relies on: index 999 is out of range on this server."""
    with redis_server.client() as client:
        assert client.config_get("databases") == {"databases": "16"}


def test_a_redis_url_at_the_port_of_postgresql_is_one_line(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    """A Redis URL at PostgreSQL's port: PostgreSQL closes the connection without a reply, so
    this looks like an outage. Still one line, naming the address, within the wait."""
    where = f"{postgres_server.host}:{postgres_server.port}/0"
    proc, _ = taskmill(tmp_path, f"redis://{where}?unavailable_after_s=0.5", "queues")
    line = one_error_line(proc)
    assert line.startswith(f"error: Redis at {where} did not answer within 0.5 s"), line
