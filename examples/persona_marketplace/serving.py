"""Running the example's ``taskmill worker`` processes, as the demo (``__main__``) starts them;
the end-to-end tests start them the same way. The API is served on a thread by
``examples._support.serving``."""

from __future__ import annotations

import subprocess
import sys
from typing import IO

from examples._support.processes import ROOT, child_env
from examples.persona_marketplace.config import Config

WORKER_APP = "examples.persona_marketplace.worker:app"


def worker_command(*options: str) -> list[str]:
    """``taskmill worker`` as the seed ran ``celery worker``: sync tasks in child processes
    (``--pool process``, so the hard time limit can kill one), each child replaced after 10
    jobs (``--max-tasks-per-child``), and as many jobs claimed as there are free slots: one
    job per child at a time, none prefetched."""
    return [
        sys.executable, "-m", "taskmill", "worker", WORKER_APP,
        "--pool", "process", "--max-tasks-per-child", "10", *options,
    ]  # fmt: skip


def start_worker(config: Config, log: IO[bytes], *options: str) -> subprocess.Popen[bytes]:
    """One ``taskmill worker`` process (in a session of its own: a signal to the demo's
    terminal does not reach it twice) on the example's app, configured by ``config``."""
    return subprocess.Popen(
        worker_command(*options),
        cwd=ROOT,
        env=child_env(config.to_env(), drop_prefixes=("TASKMILL_", "PERSONA_")),
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
