"""What the fault tests share: a ``taskmill worker`` supervisor loading ``faults.jobs:app``,
its children found and killed on a schedule, enqueues recorded in the ledger, and the drain."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import IO

from faults.checker import TERMINAL_STATES
from faults.ledger import LEDGER_ENV, Enqueue, Ledger, Outcome
from faults.processes import worker_children
from faults.schedule import Kill
from taskmill import App
from taskmill.brokers._rows import RECOVERED_ERROR_TYPE
from taskmill.testing import wait_until

TESTS = Path(__file__).resolve().parent.parent


class Supervisor:
    """``taskmill worker --app faults.jobs:app ARGS`` in a process group of its own (killed
    with its children on close), logging to ``worker.log`` in ``tmp_path``."""

    def __init__(self, tmp_path: Path, url: str, ledger: Ledger, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TASKMILL_")}
        env["TASKMILL_URL"] = url
        env[LEDGER_ENV] = str(ledger.path)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        self.log_path = tmp_path / "worker.log"
        self._log: IO[bytes] = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "taskmill", "worker", "--app", "faults.jobs:app", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
            start_new_session=True,
        )

    def children(self) -> list[int]:
        """The supervisor's live child processes (its worker processes), sorted by pid."""
        return worker_children(self.proc.pid)

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


def kill_children(
    supervisor: Supervisor, ledger: Ledger, schedule: list[Kill], start: float
) -> list[int]:
    """Run ``schedule`` from ``start`` (a ``time.monotonic()``): at each kill, SIGKILL one of
    the live children, then record it in the ledger. The pids killed."""
    killed = []
    for kill in schedule:
        delay = start + kill.at_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # the schedule's own timing, not a wait for some state
        pids = wait_until(supervisor.children, what="a live worker child", timeout=20)
        victim = pids[kill.target % len(pids)]
        os.kill(victim, signal.SIGKILL)
        # the time after the kill: every execution in the victim started before it (a time
        # taken before, then an fsync of the ledger, let executions start after "the kill")
        ledger.record_fault("kill -9", victim, "worker child", t=time.time())
        killed.append(victim)
    return killed


class Producer(threading.Thread):
    """Sends ``count`` jobs of ``faults.work`` (each a pause of 0-50 ms drawn from ``seed``)
    evenly over ``over_s`` seconds, each with an id chosen beforehand, and records every
    attempt and its outcome in the ledger."""

    def __init__(self, app: App, ledger: Ledger, count: int, over_s: float, seed: int) -> None:
        super().__init__(name="producer", daemon=True)
        self.app, self.ledger, self.count, self.over_s = app, ledger, count, over_s
        self.rng = random.Random(seed)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._produce()
        except BaseException as exc:
            self.error = exc

    def _produce(self) -> None:
        start = time.monotonic()
        batch: list[Enqueue] = []
        for i in range(self.count):
            delay = start + i * self.over_s / self.count - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # pacing the load, not a wait for some state
            job_id = f"f-{uuid.uuid4().hex[:16]}"
            pause_ms = self.rng.randrange(51)
            try:
                self.app.send_task("faults.work", [pause_ms], job_id=job_id)
            except Exception as exc:
                # T1 injects no broker faults: a failed send counts as unknown (not lost)
                batch.append(Enqueue(job_id, time.time(), Outcome.UNKNOWN, repr(exc)))
            else:
                batch.append(Enqueue(job_id, time.time(), Outcome.OK))
            if len(batch) >= 100:
                self.ledger.record_enqueues(batch)
                batch = []
        self.ledger.record_enqueues(batch)


def final_states(app: App) -> dict[str, str]:
    """Job id -> state name, for every job the broker has."""
    jobs = app.run_sync(app.broker.list_jobs(limit=1_000_000))
    return {j.id: str(j.state) for j in jobs}


def quarantined(app: App, states: dict[str, str]) -> set[str]:
    """The failed jobs of ``states`` that the broker failed by its lost-lease rule (crash
    poison: ``max_lost_leases`` leases lost), by their stored error."""
    failed = [job_id for job_id, state in states.items() if state == "failed"]
    jobs = app.run_sync(app.broker.get_many(failed)) if failed else []
    return {
        j.id for j in jobs if j is not None and j.error and j.error.type == RECOVERED_ERROR_TYPE
    }


def drain(app: App, expected: int, timeout: float) -> dict[str, str]:
    """Wait until the broker has ``expected`` jobs, all terminal; their final states."""

    def done() -> dict[str, str] | None:
        states = final_states(app)
        finished = sum(s in TERMINAL_STATES for s in states.values())
        return states if finished >= expected else None

    def what() -> str:
        states = final_states(app)
        counts: dict[str, int] = {}
        for s in states.values():
            counts[s] = counts.get(s, 0) + 1
        return f"{expected} jobs to finish (states now: {counts})"

    return wait_until(done, what=what, timeout=timeout, interval=0.5)
