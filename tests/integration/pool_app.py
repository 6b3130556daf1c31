"""Tasks for the ``--pool process`` tests: the worker's children import ``pool_app:app``.

The test builds the same tasks on its own broker with ``build_app(url)``; names are explicit so
both sides agree whatever this package is imported as.
"""

from __future__ import annotations

import os
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

from taskmill import App, Retry, SoftTimeLimitExceeded, current_job
from taskmill.testing import wait_until


class QuotaExceededError(Exception):
    """Raised by a task; listed in its ``dont_retry_on``."""


# Retries wait longer than a heartbeat's round trip: a heartbeat still carrying the first
# attempt's claim can report the job lost by its id, which stops the second attempt if the
# same worker claimed it meanwhile (a worker race outside time limits).
RETRY_AFTER_S = 0.5
IMPORT_DELAY_ENV = "POOL_APP_IMPORT_DELAY_S"
"""Seconds importing this module takes (default 0)."""


def build_app(url: str = "memory://", **settings: Any) -> App:
    app = App(url, **settings)

    @app.task(name="pool.square")
    def square(x: int) -> int:
        return x * x

    @app.task(name="pool.pid")
    def pid() -> int:
        return os.getpid()

    @app.task(name="pool.boom", retries=0)
    def boom(n: int) -> None:
        raise LookupError(f"no row {n} in child {os.getpid()}")

    @app.task(name="pool.nan", retries=3, backoff=0)
    def nan() -> float:
        return float("nan")

    @app.task(name="pool.quota", retries=3, backoff=0, dont_retry_on=QuotaExceededError)
    def quota() -> None:
        raise QuotaExceededError("monthly quota used up")

    @app.task(name="pool.flaky", retries=3, backoff=0)
    def flaky(fail_times: int) -> list[int]:
        job = current_job()
        if job.attempt <= fail_times:
            raise ConnectionError(f"attempt {job.attempt} failed")
        return [job.attempt, os.getpid()]

    @app.task(name="pool.ask_retry", retries=2, backoff=3600)
    def ask_retry() -> int:
        if current_job().attempt == 1:
            raise Retry(delay=0, reason="not ready yet")
        return current_job().attempt

    @app.task(name="pool.hang", retries=0, timeout=1)
    def hang(pid_file: str) -> None:
        Path(pid_file).write_text(str(os.getpid()))
        time.sleep(120)

    @app.task(name="pool.spawn_and_hang", retries=0, timeout=1)
    def spawn_and_hang(pid_file: str) -> None:
        # ``sleep`` stands in for ffmpeg: a subprocess the task waits on, in the child's group
        sleeper = subprocess.Popen(["sleep", "300"])
        Path(pid_file).write_text(f"{os.getpid()} {sleeper.pid}")
        sleeper.wait()

    @app.task(name="pool.soft_cleanup", retries=0, soft_timeout=0.3, timeout=30)
    def soft_cleanup(marker: str) -> str:
        job = current_job()
        try:
            time.sleep(30)
        except SoftTimeLimitExceeded as exc:
            Path(marker).write_text(f"{exc} | flag={job.soft_limit_exceeded} {job.cancelled}")
            return "cleaned up"
        return "slept through"

    @app.task(name="pool.soft_ignored", retries=0, soft_timeout=0.3, timeout=1.5)
    def soft_ignored(pid_file: str) -> None:
        try:
            time.sleep(30)
        except SoftTimeLimitExceeded:
            Path(pid_file).write_text(str(os.getpid()))
            time.sleep(30)

    @app.task(
        name="pool.soft_reraised", retries=1, backoff=RETRY_AFTER_S, soft_timeout=0.3, timeout=30
    )
    def soft_reraised() -> None:
        sleeper = subprocess.Popen(["sleep", "300"])
        try:
            sleeper.wait()
        finally:
            sleeper.kill()
            sleeper.wait()

    @app.task(name="pool.exit", retries=0)
    def exit_now(code: int) -> None:
        os._exit(code)

    @app.task(name="pool.exit_first", retries=1, backoff=0)
    def exit_first() -> str:
        if current_job().attempt == 1:
            os._exit(1)
        return "survived"

    @app.task(name="pool.progress")
    def progress(release_file: str) -> str:
        current_job().progress(0.5, f"half done in {os.getpid()}")
        wait_until(lambda: os.path.exists(release_file), timeout=30, what="the release file")
        return "released"

    @app.task(name="pool.cooperative")
    def cooperative(marker: str) -> str:
        job = current_job()
        job.progress(0.0, "started")
        deadline = time.monotonic() + 30
        while not job.cancelled and time.monotonic() < deadline:
            time.sleep(0.01)
        Path(marker).write_text(f"{os.getpid()} cancelled={job.cancelled}")
        return "stopped"

    @app.task(name="pool.typed")
    def typed(when: datetime, ids: set[UUID]) -> dict[str, list[str]]:
        def names(values: Any) -> list[str]:
            return [type(v).__name__ for v in values]

        return {"received": names([when, ids]), "current_job": names(current_job().args)}

    return app


# a ``taskmill worker`` process of the tests gets its broker from TASKMILL_URL
app = build_app(os.environ.get("TASKMILL_URL", "memory://"))

# a child that is slow to start (a loaded machine, a heavy app), as the tests set it
time.sleep(float(os.environ.get(IMPORT_DELAY_ENV, "0")))
