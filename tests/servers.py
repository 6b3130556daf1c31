"""Real servers for the tests, started as subprocesses on free loopback ports.

``RedisServer`` runs one ``redis-server`` with its data in a directory of its own, answers
``PING`` before ``start()`` returns, and can be stopped, killed and restarted on the same port
(clients reconnect to the same URL). No fakes: the suite talks to the server it ships with.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import IO, Any

import redis

INSTALL_HINT = "run scripts/install-test-deps.sh (make test does) to install redis-server"
START_TIMEOUT_S = 15.0


class ServerMissingError(RuntimeError):
    """The server binary is not installed."""


class PortTakenError(RuntimeError):
    """Another process listens on the port the server was to use."""


def free_port() -> int:
    """A loopback TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_server_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise ServerMissingError(f"redis-server is not on PATH; {INSTALL_HINT}")
    return path


class RedisServer:
    """One ``redis-server`` process on ``127.0.0.1:port``, data in ``directory``.

    ``appendonly=True`` runs it with ``appendfsync always``: every write a client saw
    acknowledged is on disk, so it survives ``kill()`` + ``start()``.
    """

    host = "127.0.0.1"

    def __init__(self, directory: Path, *, appendonly: bool = False, port: int | None = None):
        self.binary = redis_server_binary()
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.appendonly = appendonly
        self.port = port or free_port()
        self.log_path = directory / "redis-server.log"
        self._fixed_port = port is not None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._log_start = 0
        self._frozen = False

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<RedisServer {self.url} {state} appendonly={self.appendonly}>"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def args(self) -> list[str]:
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            "",  # stdout, which goes to log_path
        ]
        if self.appendonly:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        return args

    def output(self, since: int = 0) -> str:
        """The server's log (from byte ``since``)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def client(self, **options: Any) -> redis.Redis:
        """A new synchronous client (bytes replies); close it when done."""
        kwargs: dict[str, Any] = {"socket_timeout": 5.0, "socket_connect_timeout": 5.0}
        kwargs.update(options)
        return redis.Redis(host=self.host, port=self.port, db=0, **kwargs)

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start the server (on the same port as before, if it ran) and wait for ``PING``."""
        if self.running:
            return
        for attempt in range(3):
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in _reap()
            self._log_start = self._log.tell()
            self._proc = subprocess.Popen(
                self.args(), stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
            try:
                self._wait_ready(timeout)
                self._fixed_port = True  # from now on, restarts keep the clients' URL
                return
            except PortTakenError:
                self._reap(signal.SIGKILL)
                if self._fixed_port or attempt == 2:
                    raise
                self.port = free_port()  # someone took the free port first: pick another
            except BaseException:
                self._reap(signal.SIGKILL)
                raise

    def _wait_ready(self, timeout: float) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while True:
            code = self._proc.poll()
            if code is not None:
                log = self.output(self._log_start)
                error = PortTakenError if "Address already in use" in log else RuntimeError
                raise error(
                    f"redis-server on port {self.port} exited with {code} while starting:\n{log}"
                )
            try:
                with contextlib.closing(self.client(socket_timeout=1.0)) as c:
                    if c.ping():  # a server still loading its AOF answers LOADING: wait on
                        return
            except redis.RedisError as exc:
                last = exc
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"redis-server on port {self.port} did not answer PING within {timeout} s "
                    f"(last error: {last!r}); its log:\n{self.output(self._log_start)}"
                )
            time.sleep(0.02)

    def freeze(self) -> None:
        """SIGSTOP: the port still accepts connections (the kernel's backlog) but nothing is
        answered, as with a hung host or a network that drops packets. ``thaw()`` resumes."""
        assert self._proc is not None and self.running, "freeze() needs a running server"
        self._proc.send_signal(signal.SIGSTOP)
        self._frozen = True

    def thaw(self) -> None:
        if self._proc is not None and self._frozen:
            self._proc.send_signal(signal.SIGCONT)
        self._frozen = False

    def stop(self) -> None:
        """Stop gracefully (SIGTERM: Redis fsyncs the AOF and closes every connection)."""
        self._reap(signal.SIGTERM)

    def kill(self) -> None:
        """Stop at once (SIGKILL), as a crash or an OOM kill would."""
        self._reap(signal.SIGKILL)

    def restart(self, *, kill: bool = False, down_s: float = 0.0) -> None:
        """Stop (``kill=True``: SIGKILL) and start again on the same port. ``down_s`` keeps the
        port closed that long, so clients see refused connections in between."""
        if kill:
            self.kill()
        else:
            self.stop()
        if down_s > 0:
            time.sleep(down_s)  # an outage of a given length, not synchronisation
        self.start()

    def _reap(self, sig: signal.Signals) -> None:
        self.thaw()  # a stopped process would not act on SIGTERM
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
