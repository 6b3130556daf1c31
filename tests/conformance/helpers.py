"""Broker-agnostic helpers of the conformance suite: the opened broker, subprocesses, and
polling (``wait_until``, taskmill's own, re-exported so the suite's modules import from here).

Nothing here knows which broker it talks to; broker-specific code belongs in ``conftest.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from taskmill import App
from taskmill.brokers.base import Broker
from taskmill.job import Claim, Job, WorkerInfo
from taskmill.testing import wait_until as wait_until  # the conformance modules' one import

PACKAGE = __name__.rpartition(".")[0]
"""This package's import name (``conformance``, or ``tests.conformance`` if tests/ is one)."""
IMPORT_ROOT = Path(__file__).resolve().parents[PACKAGE.count(".") + 1]
"""The directory that must be on ``sys.path`` for ``PACKAGE`` to import (for subprocesses)."""
SETTINGS_ENV = "CONFORMANCE_APP_SETTINGS"
"""JSON of the App settings a subprocess's ``apps.app`` is built with."""


def opened(app: App) -> Broker:
    """The app's broker, connected; call its coroutines with ``app.run_sync(...)``."""
    app.open()
    return app.broker


def claim_one(app: App, queue: str = "default", *, lease_s: float, worker: str = "dead") -> Job:
    """Claim the next job directly through the broker, as a worker that will never heartbeat."""
    jobs = app.run_sync(opened(app).claim([queue], 1, worker, lease_s))
    assert len(jobs) == 1, f"expected to claim one job from {queue!r}, got {jobs}"
    return jobs[0]


def claim_of(job: Job) -> Claim:
    assert job.lease_token is not None
    return Claim(job.id, job.lease_token)


def worker_info(worker_id: str = "dead") -> WorkerInfo:
    now = time.time()
    return WorkerInfo(
        id=worker_id,
        host="test",
        pid=os.getpid(),
        queues=["default"],
        concurrency=1,
        started_at=now,
        heartbeat_at=now,
    )


def recover_until(app: App, job_id: str, *, timeout: float = 10.0) -> str:
    """Run ``broker.recover`` until it recovers ``job_id``; the state it moved the job to."""
    broker = opened(app)
    max_lost = app.settings.max_lost_leases

    def attempt() -> str | None:
        for recovered_id, state in app.run_sync(broker.recover(max_lost)):
            if recovered_id == job_id:
                return state.value
        return None

    return wait_until(attempt, timeout=timeout, what=f"the lease of {job_id} to be recovered")


# --- subprocesses ---------------------------------------------------------------------------


def subprocess_env(url: str, settings: dict[str, Any]) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(IMPORT_ROOT), *filter(None, [env.get("PYTHONPATH")])]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["TASKMILL_URL"] = url
    env[SETTINGS_ENV] = json.dumps(settings)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Process:
    """A child process whose output goes to a file (read it with ``output()`` on failure)."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            [sys.executable, *args], env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log_path.read_text("utf-8", "replace")

    def signal(self, sig: signal.Signals) -> None:
        self.popen.send_signal(sig)

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"process {self.pid} still running after {timeout} s; output:\n{self.output()}"
            ) from None

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)
        self._log.close()


@contextlib.contextmanager
def processes() -> Iterator[Callable[[list[str], dict[str, str], Path], Process]]:
    """Start child processes inside a ``with`` block; every one is killed when it ends."""
    started: list[Process] = []

    def start(args: list[str], env: dict[str, str], log_path: Path) -> Process:
        proc = Process(args, env, log_path)
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            proc.stop()


def worker_args(
    *,
    concurrency: int = 4,
    drain_timeout_s: float = 30.0,
    queues: str | None = None,
) -> list[str]:
    args = [
        "-m",
        f"{PACKAGE}.worker_main",
        f"{PACKAGE}.apps:app",
        "--concurrency",
        str(concurrency),
        "--drain-timeout",
        str(drain_timeout_s),
    ]
    if queues:
        args += ["--queues", queues]
    return args


def producer_args(db: Path, count: int, ids: Path) -> list[str]:
    return ["-m", f"{PACKAGE}.producer_main", str(db), str(count), str(ids)]
