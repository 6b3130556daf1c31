"""Running the example's parts: the API under uvicorn on a thread, and ``taskmill worker``
processes, as the demo (``__main__``) starts them. The end-to-end tests start them the same way."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import uvicorn

from examples.persona_marketplace.config import Config

ROOT = Path(__file__).resolve().parents[2]
WORKER_APP = "examples.persona_marketplace.worker:app"


@dataclass
class Served:
    url: str
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def serve(asgi: Any, port: int = 0, timeout_s: float = 15.0) -> Served:
    """Serve ``asgi`` on ``127.0.0.1:port`` (0: a port the OS picks, bound here first so that
    nobody takes it meanwhile), running its lifespan; returns once it accepts requests."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    config = uvicorn.Config(
        asgi, log_level="warning", access_log=False, timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="persona-api", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("the persona API did not start (see the log above)")
        time.sleep(0.02)
    return Served(f"http://127.0.0.1:{sock.getsockname()[1]}", server, thread)


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
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TASKMILL_", "PERSONA_"))}
    env.update(config.to_env())
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return subprocess.Popen(
        worker_command(*options),
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
