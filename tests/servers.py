"""Real servers for the tests, started as subprocesses on free loopback ports.

``RedisServer`` runs one ``redis-server`` with its data in a directory of its own, answers
``PING`` before ``start()`` returns, and can be stopped, killed and restarted on the same port
(clients reconnect to the same URL). ``PostgresServer`` does the same for a PostgreSQL cluster
made by ``initdb`` in a temporary directory. No fakes: the suite talks to the servers it ships
with.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import psycopg
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


# --- PostgreSQL ------------------------------------------------------------------------------

PG_INSTALL_HINT = "run scripts/install-test-deps.sh (make test does) to install postgresql"


def postgres_bindir() -> Path:
    """The directory of ``initdb`` and ``postgres``: ``pg_config --bindir``, else the newest
    ``/usr/lib/postgresql/*/bin`` (Debian keeps them off PATH)."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            )
            candidates.append(Path(out.stdout.strip()))

    def version(path: str) -> tuple[int, ...]:
        digits = Path(path).parent.name.split(".")
        return tuple(int(d) for d in digits if d.isdigit())

    candidates += [
        Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
    ]
    for directory in candidates:
        if (directory / "initdb").is_file() and (directory / "postgres").is_file():
            return directory
    raise ServerMissingError(f"PostgreSQL's initdb and postgres were not found; {PG_INSTALL_HINT}")


class PostgresServer:
    """One PostgreSQL cluster on ``127.0.0.1:port``, its data directory in a temporary
    directory of its own (removed by ``cleanup()``).

    PostgreSQL refuses to run as root, so when the tests run as root (CI) ``initdb`` and
    ``postgres`` run as the ``postgres`` system user, and the directory belongs to it. Local
    connections are trusted (user ``postgres``, no password); ``fsync`` stays on, the server's
    default durability. ``stop()`` is a fast shutdown (SIGINT: clients are disconnected),
    ``kill()`` an immediate one (SIGQUIT: no checkpoint, crash recovery at the next start).
    """

    host = "127.0.0.1"
    user = "postgres"

    def __init__(self, *, port: int | None = None) -> None:
        self.bindir = postgres_bindir()
        self.port = port or free_port()
        self._fixed_port = port is not None
        self._run_as = self._system_user()
        # not under pytest's temp dir: that one is private to root (0700), and the postgres
        # user must reach its data directory
        self.directory = Path(tempfile.mkdtemp(prefix="taskmill-pg-"))
        self.data = self.directory / "data"
        self.log_path = self.directory / "postgres.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._log_start = 0
        self._initdb()

    @staticmethod
    def _system_user() -> str | None:
        if os.geteuid() != 0:
            return None
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            raise ServerMissingError(
                f"running as root, but there is no 'postgres' user to run the server; "
                f"{PG_INSTALL_HINT}"
            ) from None
        return "postgres"

    def _popen_user(self) -> dict[str, Any]:
        """subprocess options that drop root for the ``postgres`` user (the equivalent of
        ``runuser -u postgres --``, but the child is the server itself, so signals reach it)."""
        if self._run_as is None:
            return {}
        return {"user": self._run_as, "group": self._run_as, "extra_groups": []}

    def _initdb(self) -> None:
        if self._run_as is not None:
            shutil.chown(self.directory, self._run_as, self._run_as)
        args = [
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            self.user,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",  # initdb's own fsyncs only; the server runs with fsync on
        ]
        proc = subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=self.directory,
            env={**os.environ, "LC_ALL": "C"},
            **self._popen_user(),
        )
        if proc.returncode != 0:
            raise RuntimeError(f"initdb failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")

    @property
    def url(self) -> str:
        return self.url_for("postgres")

    def url_for(self, database: str) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<PostgresServer {self.url} {state}>"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def args(self) -> list[str]:
        return [
            str(self.bindir / "postgres"),
            "-D",
            str(self.data),
            "-p",
            str(self.port),
            "-c",
            f"listen_addresses={self.host}",
            "-c",
            f"unix_socket_directories={self.data}",
            "-c",
            "fsync=on",
            "-c",
            "max_connections=300",  # several worker processes, each with its pools
            "-c",
            "logging_collector=off",
        ]

    def output(self, since: int = 0) -> str:
        """The server's log (from byte ``since``)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def connect(self, database: str = "postgres", **options: Any) -> psycopg.Connection[Any]:
        """A new autocommit connection (close it when done)."""
        kwargs: dict[str, Any] = {"autocommit": True, "connect_timeout": 5}
        kwargs.update(options)
        return psycopg.connect(self.url_for(database), **kwargs)

    def create_database(self, name: str) -> str:
        """Create a database; its URL."""
        with self.connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url_for(name)

    def add_password_role(self, role: str, password: str) -> None:
        """A login role that must give ``password`` (scram-sha-256) over TCP; every other role
        stays trusted. The rule goes first in pg_hba.conf, and the server reloads it."""
        with self.connect() as conn:
            conn.execute(f"CREATE ROLE {role} LOGIN SUPERUSER PASSWORD '{password}'")
        hba = self.data / "pg_hba.conf"
        rules = hba.read_text()
        hba.write_text(f"host all {role} {self.host}/32 scram-sha-256\n{rules}")  # keeps owner
        with self.connect() as conn:
            conn.execute("SELECT pg_reload_conf()")
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:  # the reload is asynchronous: wait until a wrong password is refused
            try:
                with self.connect(user=role, password="not-" + password):
                    pass
            except psycopg.OperationalError as exc:
                if "password authentication failed" in str(exc):
                    return
                raise
            if time.monotonic() > deadline:
                raise RuntimeError(f"pg_hba.conf reload did not take effect: {role} trusted")
            time.sleep(0.02)

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start the server (on the same port as before, if it ran) and wait until it accepts
        connections."""
        if self.running:
            return
        for attempt in range(3):
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in _reap()
            self._log_start = self._log.tell()
            self._proc = subprocess.Popen(
                self.args(),
                stdout=self._log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.directory,
                **self._popen_user(),
            )
            try:
                self._wait_ready(timeout)
                self._fixed_port = True  # from now on, restarts keep the clients' URL
                return
            except PortTakenError:
                self._reap(signal.SIGQUIT)
                if self._fixed_port or attempt == 2:
                    raise
                self.port = free_port()  # someone took the free port first: pick another
            except BaseException:
                self._reap(signal.SIGQUIT)
                raise

    def _wait_ready(self, timeout: float) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while True:
            code = self._proc.poll()
            if code is not None:
                log = self.output(self._log_start)
                taken = "Address already in use" in log or "could not bind" in log
                error = PortTakenError if taken else RuntimeError
                raise error(
                    f"postgres on port {self.port} exited with {code} while starting:\n{log}"
                )
            try:
                with self.connect(connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                    return
            except psycopg.OperationalError as exc:  # refused, or "starting up"
                last = exc
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"postgres on port {self.port} did not accept connections within {timeout} s "
                    f"(last error: {last!r}); its log:\n{self.output(self._log_start)}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """Fast shutdown (SIGINT): open transactions are rolled back, clients disconnected,
        and everything committed is on disk."""
        self._reap(signal.SIGINT)

    def kill(self) -> None:
        """Immediate shutdown (SIGQUIT), as after a crash: the next start replays the WAL.
        (A SIGKILL of the postmaster would leave its backends behind, holding the port.)"""
        self._reap(signal.SIGQUIT)

    def restart(self, *, kill: bool = False, down_s: float = 0.0) -> None:
        """Stop (``kill=True``: immediate shutdown) and start again on the same port.
        ``down_s`` keeps the port closed that long, so clients see refused connections."""
        if kill:
            self.kill()
        else:
            self.stop()
        if down_s > 0:
            time.sleep(down_s)  # an outage of a given length, not synchronisation
        self.start()

    def _reap(self, sig: signal.Signals) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def cleanup(self) -> None:
        """Stop the server and remove its directory."""
        self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
