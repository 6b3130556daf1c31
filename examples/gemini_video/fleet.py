"""The fleet: every worker pool of the seed, started by one ``taskmill worker`` command, and the
dashboard beside it (the seed's ``start-workers.sh --with-flower``).

Each pool is a ``--pool-spec QUEUES:PROCESSES:CONCURRENCY`` of that command: one supervisor
runs them all, restarts a process that dies, and passes SIGTERM on to every one of them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from taskmill import App
from taskmill.errors import TaskmillError

ROOT = Path(__file__).resolve().parents[2]
APP_PATH = "examples.gemini_video.app:app"
WORKER_NAME = "gemini-video"
DASHBOARD_USER = "ops"
DRAIN_TIMEOUT_S = 10


@dataclass(frozen=True)
class Pool:
    """One worker pool: its queues, its processes, and the jobs each process runs at once."""

    name: str
    queues: tuple[str, ...]
    processes: int
    concurrency: int

    @property
    def spec(self) -> str:
        return f"{','.join(self.queues)}:{self.processes}:{self.concurrency}"


POOLS = (
    Pool("ml", ("hubspot-webhook-events", "fatigue-monitoring", "budget-optimization"), 1, 4),
    Pool("render", ("render_queue",), 1, 2),
    Pool("preview", ("preview_queue", "video-maintenance"), 1, 4),
    Pool("transcode", ("transcode_queue",), 1, 2),
    Pool("caption", ("caption_queue",), 1, 1),
)
"""The seed's concurrency table: ML 4, render 2, preview 4, transcode 2, caption 1. The Beat
tasks of the video agent (cleanup, resource monitor) go to ``video-maintenance``, served by the
light preview pool."""


def pool_of(queues: list[str] | tuple[str, ...]) -> str:
    """The pool whose queues these are (as ``taskmill workers`` lists a process's queues)."""
    for pool in POOLS:
        if set(pool.queues) == set(queues):
            return pool.name
    return "?"


def taskmill_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "taskmill", *args]


def worker_argv() -> list[str]:
    """The one command that starts every pool."""
    specs = [arg for pool in POOLS for arg in ("--pool-spec", pool.spec)]
    drain = ("--drain-timeout", str(DRAIN_TIMEOUT_S))
    return taskmill_argv("worker", APP_PATH, *specs, "--name", WORKER_NAME, *drain)


def dashboard_argv(port: int) -> list[str]:
    return taskmill_argv("dashboard", APP_PATH, "--port", str(port), "--log-level", "warning")


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra or {})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Fleet:
    """The worker pools and, given a port and a password, the dashboard with a login.

    The children stay in this process's group, so a Ctrl-C on the terminal reaches them
    directly; ``stop()`` sends SIGTERM (a drain) to each and waits."""

    def __init__(self, *, dashboard_port: int | None, password: str | None) -> None:
        if dashboard_port is not None and not password:
            raise ValueError(
                "the dashboard needs a login: set GEMINI_VIDEO_DASHBOARD_PASSWORD "
                f"(the user is {DASHBOARD_USER!r})"
            )
        self.dashboard_port = dashboard_port
        self.password = password
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def expected_processes(self) -> int:
        return sum(pool.processes for pool in POOLS)

    def start(self, log: IO[bytes] | None = None) -> Fleet:
        self.procs.append(
            subprocess.Popen(
                worker_argv(),
                cwd=ROOT,
                env=child_env(),
                stdout=log,
                stderr=subprocess.STDOUT if log else None,
            )
        )
        if self.dashboard_port is not None:
            users = {"TASKMILL_DASHBOARD_USERS": f"{DASHBOARD_USER}:{self.password}"}
            self.procs.append(
                subprocess.Popen(
                    dashboard_argv(self.dashboard_port),
                    cwd=ROOT,
                    env=child_env(users),
                    stdout=log,
                    stderr=subprocess.STDOUT if log else None,
                )
            )
        return self

    def wait_ready(
        self, app: App, timeout_s: float = 60.0, interrupted: Callable[[], bool] = lambda: False
    ) -> int:
        """Wait until every pool's processes heartbeat (their number), or ``interrupted()``
        (0)."""
        deadline = time.monotonic() + timeout_s
        while not interrupted():
            self.check_running()
            alive = [w for w in app.workers() if not w.lost and w.id.startswith(WORKER_NAME)]
            if len(alive) >= self.expected_processes:
                return len(alive)
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(alive)} of {self.expected_processes} worker processes registered "
                    f"within {timeout_s:.0f} s"
                )
            time.sleep(0.2)
        return 0

    def check_running(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                what = "the dashboard" if proc is not self.procs[0] else "taskmill worker"
                raise RuntimeError(f"{what} exited early with code {proc.returncode}")

    def stop(self, *, signalled: bool = False, timeout_s: float = DRAIN_TIMEOUT_S + 10) -> int:
        """SIGTERM every child and wait for each (then kill what is left); the worst exit code.
        ``signalled``: a Ctrl-C reached the children already, so they are draining; a second
        signal would stop them at once instead, so only wait."""
        if not signalled:
            for proc in self.procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        codes = []
        for proc in self.procs:
            try:
                codes.append(proc.wait(max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(proc.wait())
        return max(codes, default=0)


def run_foreground(dashboard_port: int | None) -> int:
    """``python -m examples.gemini_video workers``: the fleet until SIGTERM or Ctrl-C."""
    from examples.gemini_video.app import app

    try:
        fleet = Fleet(
            dashboard_port=dashboard_port,
            password=os.environ.get("GEMINI_VIDEO_DASHBOARD_PASSWORD"),
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    fleet.start()
    try:
        count = fleet.wait_ready(app, interrupted=lambda: bool(received))
        where = f"; dashboard http://127.0.0.1:{dashboard_port}/" if dashboard_port else ""
        if count:
            print(f"fleet ready: {count} worker processes in {len(POOLS)} pools{where}", flush=True)
    except (TimeoutError, RuntimeError, TaskmillError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        fleet.stop()
        return 1
    finally:
        app.close()
    while not received and all(p.poll() is None for p in fleet.procs):
        time.sleep(0.2)
    return fleet.stop(signalled=received[:1] == [signal.SIGINT])
