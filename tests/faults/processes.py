"""``taskmill worker`` and ``taskmill scheduler`` processes loading a fault app, each in a
process group of its own and logging to a file of its own in the test's directory; and
libfaketime to start one on a clock offset from the machine's."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from faults.ledger import LEDGER_ENV, Ledger
from taskmill.testing import wait_until
from taskmill.worker.forkserver import FORK_SERVER_NAME

TESTS = Path(__file__).resolve().parent.parent


LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"
"""Debian's libfaketime (package ``faketime``, which scripts/install-test-deps.sh installs)."""


FAKETIME_SITE = Path(__file__).resolve().parent / "faketime_site"
"""Its ``sitecustomize`` works around libfaketime's broken ``time.sleep`` (see there)."""


def faketime_env(offset_s: float) -> dict[str, str]:
    """The environment that runs a program ``offset_s`` seconds off the machine's wall clock
    (its monotonic clock stays real), through libfaketime preloaded: not the ``faketime``
    command, which forks and would take the signals meant for the program."""
    if not Path(LIBFAKETIME).exists():
        raise RuntimeError(f"{LIBFAKETIME} is missing: scripts/install-test-deps.sh installs it")
    return {
        "LD_PRELOAD": LIBFAKETIME,
        "FAKETIME": f"{offset_s:+g}s",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }


class Proc:
    """One ``taskmill`` process: ``kind`` is ``worker`` or ``scheduler``."""

    def __init__(
        self,
        tmp_path: Path,
        name: str,
        url: str,
        ledger: Ledger,
        kind: str,
        app: str,
        *args: str,
        env: dict[str, str] | None = None,
        clock_offset_s: float = 0.0,
    ) -> None:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("TASKMILL_")}
        full_env.update(env or {})
        full_env["TASKMILL_URL"] = url
        full_env[LEDGER_ENV] = str(ledger.path)
        site = [str(FAKETIME_SITE)] if clock_offset_s else []
        full_env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [*site, str(TESTS), full_env.get("PYTHONPATH")])
        )
        full_env["PYTHONUNBUFFERED"] = "1"
        if clock_offset_s:
            full_env.update(faketime_env(clock_offset_s))
        self.name = name
        self.log_path = tmp_path / f"{name}.log"
        self._log: IO[bytes] = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "taskmill", kind, "--app", app, *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=tmp_path,
            start_new_session=True,
        )
        self.pid = self.proc.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: signal.Signals) -> float:
        """Send ``sig``; the time (``time.time()``) just before."""
        t = time.time()
        self.proc.send_signal(sig)
        return t

    def wait_exit(self, timeout: float) -> tuple[int, float]:
        """Wait until the process exits: its exit code and the time it was seen gone."""
        code = wait_until(
            lambda: self.proc.poll() is not None,
            what=lambda: f"{self.name} ({self.pid}) to exit:\n{self.output()[-3000:]}",
            timeout=timeout,
            interval=0.02,
        )
        assert code
        return self.proc.returncode, time.time()

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._log.close()


def worker_children(pid: int) -> list[int]:
    """The live worker processes of the supervisor ``pid``, sorted: its children but its fork
    server (``taskmill.worker.forkserver``, named ``taskmill-fork``), which runs no job."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        children = [int(p) for p in path.read_text().split()]
    except FileNotFoundError:
        return []
    workers = []
    for child in children:
        try:
            name = Path(f"/proc/{child}/comm").read_text().strip()
        except FileNotFoundError:
            continue  # exited meanwhile
        if name != FORK_SERVER_NAME:
            workers.append(child)
    return sorted(workers)
