"""What the integration tests share: ``taskmill worker`` processes, reading an app's jobs back,
calls run all at once to show a wait is bounded, and reaching into a NATS broker on its own
I/O loop. (Waiting until a deadline is ``taskmill.testing.wait_until``.)"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import IO, Any, TypeVar

from taskmill import App, JobState
from taskmill.job import Job
from taskmill.testing import await_until, wait_until

HERE = Path(__file__).resolve().parent
T = TypeVar("T")


class Workers:
    """``taskmill worker --app APP`` processes, each in a process group of its own (killed
    with its children on close) and logging to a file of its own."""

    def __init__(self, tmp_path: Path, app: str) -> None:
        self.tmp_path = tmp_path
        self.app = app
        self.procs: list[tuple[subprocess.Popen[bytes], Path, IO[bytes]]] = []

    def start(self, url: str, *args: str, **env_vars: str) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TASKMILL_")}
        env.update(env_vars)
        env["TASKMILL_URL"] = url
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        log_path = self.tmp_path / f"worker-{len(self.procs)}.log"
        log = log_path.open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "taskmill", "worker", "--app", self.app, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.tmp_path,
            start_new_session=True,
        )
        self.procs.append((proc, log_path, log))
        return proc

    def output(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()}" for _, p, _ in self.procs)

    def close(self) -> None:
        for proc, _, log in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            log.close()


def wait_registered(app: App, proc: subprocess.Popen[bytes], workers: Workers) -> None:
    app.open()

    def registered() -> bool:
        assert proc.poll() is None, f"the worker exited early:\n{workers.output()}"
        return any(w.pid == proc.pid for w in app.run_sync(app.broker.list_workers()))

    wait_until(registered, what=f"worker {proc.pid} to register", timeout=30)


def all_jobs(app: App, state: JobState | None = None) -> dict[str, Job]:
    app.open()
    jobs = app.run_sync(app.broker.list_jobs(state=state, limit=1_000_000))
    return {j.id: j for j in jobs}


def state_counts(app: App) -> dict[str, int]:
    app.open()
    stats = app.run_sync(app.broker.stats())
    return stats[0].counts if stats else {}


def run_at_once(
    calls: dict[str, Callable[[], object]], *, limit: float
) -> dict[str, tuple[BaseException | None, float]]:
    """Run each call on a thread of its own, all at once; name -> (what it raised, seconds it
    took). Fails if one is still blocked after ``limit`` s (its thread is left to finish)."""
    results: dict[str, tuple[BaseException | None, float]] = {}
    started = time.monotonic()

    def target(name: str, call: Callable[[], object]) -> None:
        error: BaseException | None = None
        try:
            call()
        except BaseException as exc:
            error = exc
        results[name] = (error, time.monotonic() - started)

    threads = [
        threading.Thread(target=target, args=item, name=f"call-{item[0]}", daemon=True)
        for item in calls.items()
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, started + limit - time.monotonic()))
    blocked = [name for name in calls if name not in results]
    assert not blocked, f"{blocked} still blocked after {limit} s: the wait is not bounded"
    return results


def nats_url(server_url: str, options: str = "") -> str:
    """``server_url`` with a prefix of its own (and ``options``, each starting with ``&``)."""
    return f"{server_url}?prefix=d{uuid.uuid4().hex[:10]}{options}"


def on_io_loop(app: App, coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on the broker's I/O loop, where its connection lives (30 s at most)."""
    broker: Any = app.broker
    return asyncio.run_coroutine_threadsafe(coro, broker._io_loop()).result(timeout=30)


async def nats_lanes_made(broker: Any, queues: list[str]) -> Any:
    """Lanes (priority 0) for ``queues`` on the NATS broker's session, the wake-ups that tell
    of new lanes taken in (else they would end the next wait at once); the session."""
    session = await broker._session()
    for queue in queues:
        await broker._ensure_lane(queue, 0)
    await await_until(
        lambda: session.wake_version >= len(queues), timeout=10, what="the lanes' wake-ups"
    )
    session.seen_version = session.wake_version
    return session
