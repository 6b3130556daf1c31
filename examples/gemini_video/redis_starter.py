"""A throwaway ``redis-server`` for the demo when no Redis URL is given: a free loopback port,
a temp directory, no persistence; gone when the demo ends."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType


class RedisNotFoundError(RuntimeError):
    """No ``redis-server`` on the PATH."""


class ThrowawayRedis:
    """``with ThrowawayRedis() as redis:`` starts the server and waits for its ``PING``;
    ``redis.url`` is its URL; leaving the block stops it and deletes its directory."""

    def __init__(self, start_timeout_s: float = 15.0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisNotFoundError(
                "redis-server is not on the PATH: install Redis (apt install redis-server) "
                "or pass --redis-url redis://HOST:PORT/0"
            )
        self.binary = binary
        self.start_timeout_s = start_timeout_s
        self.port = 0
        self.directory = Path(tempfile.mkdtemp(prefix="gemini-video-redis-"))
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def __enter__(self) -> ThrowawayRedis:
        self.port = _free_port()
        argv = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.directory), "--save", "", "--appendonly", "no",
            "--daemonize", "no", "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.start_timeout_s
        while not _answers_ping(self.port):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                log = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
                self.__exit__(None, None, None)
                raise RuntimeError(f"redis-server did not start on port {self.port}:\n{log}")
            time.sleep(0.05)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False
