"""What the long-run resource tests (T20-T22) share: a broker of the test's own on each server,
one ``taskmill worker faults.growth_app:app`` process, a reading of a process's resources from
``/proc``, and the least-squares slope of a series."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest
import redis

from servers import NatsServer, PostgresServer, RedisServer
from taskmill import App
from taskmill.testing import wait_until

TESTS = Path(__file__).resolve().parent.parent

BROKERS = ["sqlite", "redis", "postgres", "nats"]


@contextlib.contextmanager
def broker_url(
    name: str, request: pytest.FixtureRequest, tmp_path: Path, tag: str
) -> Iterator[str]:
    """A broker of this test's own: an SQLite file, a Redis prefix (its keys deleted after),
    a PostgreSQL database (dropped after) or a NATS prefix on the session's servers."""
    if name == "sqlite":
        yield f"sqlite:///{tmp_path / 'broker.db'}"
    elif name == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        prefix = f"{tag}-{uuid.uuid4().hex[:10]}:"
        yield f"{server.url}?prefix={prefix}"
        client = redis.Redis(server.host, server.port)
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for i in range(0, len(keys), 1000):
            client.delete(*keys[i : i + 1000])
        client.close()
    elif name == "postgres":
        postgres: PostgresServer = request.getfixturevalue("postgres_server")
        database = f"{tag}_{uuid.uuid4().hex[:12]}"
        url = postgres.create_database(database)
        yield url
        with postgres.connect() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    else:
        nats: NatsServer = request.getfixturevalue("nats_server")
        yield f"{nats.url}?prefix={tag}{uuid.uuid4().hex[:10]}"


class WorkerProcess:
    """``taskmill worker faults.growth_app:app ARGS``: one worker process (no supervisor), in
    a process group of its own (killed on close), logging to ``worker.log`` in ``tmp_path``.
    ``env`` adds to its environment (``GROWTH_*``, see ``growth_app``)."""

    def __init__(self, tmp_path: Path, url: str, *args: str, env: dict[str, str] | None = None):
        environ = {k: v for k, v in os.environ.items() if not k.startswith("TASKMILL_")}
        environ["TASKMILL_URL"] = url
        environ["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(TESTS), environ.get("PYTHONPATH")])
        )
        environ["PYTHONUNBUFFERED"] = "1"
        environ.update(env or {})
        self.log_path = tmp_path / "worker.log"
        self._log: IO[bytes] = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "taskmill", "worker", "faults.growth_app:app", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=environ,
            cwd=tmp_path,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (drain), and its exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._log.close()


@dataclass(frozen=True)
class Usage:
    """One process's resources at one moment (``jobs``: the jobs done by then)."""

    jobs: int
    rss_kb: int
    fds: int
    threads: int


def usage(pid: int, jobs: int) -> Usage:
    """``VmRSS`` and ``Threads`` from ``/proc/PID/status``, open fds from ``/proc/PID/fd``."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return Usage(
        jobs=jobs,
        rss_kb=int(fields["VmRSS"].split()[0]),
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        threads=int(fields["Threads"]),
    )


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """The least-squares slope of ``ys`` over ``xs`` (two points at least, not all one x).

    >>> slope([0, 1, 2, 3], [1, 3, 5, 7])
    2.0
    """
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    return sxy / sxx


def jobs_done(app: App) -> tuple[int, int]:
    """(runs with an outcome, those that raised) over the registered workers, as of their
    last heartbeats."""
    workers = app.run_sync(app.broker.list_workers())
    return sum(w.processed for w in workers), sum(w.failed for w in workers)


def wait_registered(app: App, worker: WorkerProcess, timeout: float = 30.0) -> None:
    """Until the worker process has heartbeated once (it registered)."""

    def registered() -> bool:
        assert worker.proc.poll() is None, f"the worker exited:\n{worker.output()}"
        return any(w.pid == worker.pid for w in app.run_sync(app.broker.list_workers()))

    wait_until(registered, what="the worker to register", timeout=timeout)
