"""One SQLite file: its URL, a connection per thread, write transactions, and the one thread
that async callers' operations run on.

A ``sqlite3`` connection must not be used by two threads at once, so each thread has its own.
Async callers reach the file through a one-thread executor per broker (``on_database_thread``),
so a lock wait never blocks their event loop and a process's async operations are serialized
on one connection; synchronous producers (``send()`` from any thread) use their own thread's.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar
from urllib.parse import parse_qsl, urlsplit

from taskmill.brokers.sqlite.schema import SCHEMA_VERSION, upgrade
from taskmill.errors import BrokerError, BrokerUnavailableError, ConfigurationError
from taskmill.portal import DaemonThreads
from taskmill.urls import redact_url

log = logging.getLogger("taskmill.brokers.sqlite")

P = ParamSpec("P")
T = TypeVar("T")

_OPTIONS = ("busy_timeout_ms", "synchronous", "poll_ms")


def parse_url(url: str) -> tuple[str, dict[str, str]]:
    """``sqlite:///relative.db`` or ``sqlite:////absolute/path.db`` → (path, options).

    >>> parse_url("sqlite:////var/lib/app/jobs.db?poll_ms=50")
    ('/var/lib/app/jobs.db', {'poll_ms': '50'})
    """
    shown = redact_url(url)  # for messages: never the password
    parts = urlsplit(url)
    if parts.scheme != "sqlite":
        raise ConfigurationError(f"not a sqlite URL: {shown!r}")
    path = parts.path
    if not url.split(":", 1)[1].startswith("//"):
        # sqlite:/x.db would read as ./x.db or as /x.db depending on whom you ask: ask again
        name = path.lstrip("/")
        raise ConfigurationError(
            f"sqlite URL {shown!r} needs // after 'sqlite:': write sqlite:///{name} for "
            f"{name} in the working directory, or sqlite:////{name} for the absolute path /{name}"
        )
    if parts.netloc:
        raise ConfigurationError(
            f"sqlite URL {shown!r} has a host; use sqlite:///relative.db or sqlite:////abs.db"
        )
    path = path[1:] if path.startswith("/") else path
    if not path or path == ":memory:":
        raise ConfigurationError(
            f"sqlite URL {shown!r} names no file; workers in other processes need a shared file "
            "(use memory:// for tests)"
        )
    return path, dict(parse_qsl(parts.query))


@dataclass(frozen=True, slots=True)
class SQLiteOptions:
    """What a ``sqlite://`` URL says."""

    path: str
    busy_timeout_ms: int = 5000
    synchronous: str = "NORMAL"
    poll_s: float = 0.2


def options_from_url(url: str) -> SQLiteOptions:
    """The URL's file and options, checked (an unknown or malformed option is an error).

    >>> options_from_url("sqlite:///jobs.db?synchronous=full").synchronous
    'FULL'
    """
    path, options = parse_url(url)
    unknown = set(options) - set(_OPTIONS)
    if unknown:
        raise ConfigurationError(
            f"unknown sqlite URL option(s) {sorted(unknown)}; known: {', '.join(_OPTIONS)}"
        )
    synchronous = options.get("synchronous", "normal").upper()
    if synchronous not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
        raise ConfigurationError(
            f"synchronous must be off/normal/full/extra, not {redact_url(url)!r}"
        )
    return SQLiteOptions(
        path,
        busy_timeout_ms=_int_option(options, "busy_timeout_ms", 5000, url),
        synchronous=synchronous,
        poll_s=_int_option(options, "poll_ms", 200, url) / 1000,
    )


def _int_option(options: dict[str, str], name: str, default: int, url: str) -> int:
    raw = options.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ConfigurationError(
            f"{name} in {redact_url(url)!r} must be a whole number >= 0, not {raw!r}"
        )
    return value


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc)
    return "locked" in text or "busy" in text


class Database:
    """One SQLite file as a process uses it: a connection per thread, reopened if the file is
    deleted or replaced; write transactions; SQLite's errors as taskmill's; and the thread
    that runs async callers' operations."""

    def __init__(self, options: SQLiteOptions) -> None:
        self.path = options.path
        self.busy_timeout_ms = options.busy_timeout_ms
        self.synchronous = options.synchronous
        self.local = threading.local()
        """Per-thread state: the thread's connection, and what others keep per thread."""
        self._generation = 0
        self._inode: int | None = None
        self._executor: DaemonThreads | None = None
        self._open_lock = threading.Lock()
        # every thread's connection, so close() can close the ones of producer threads too
        self._conns: set[sqlite3.Connection] = set()
        self._conns_lock = threading.Lock()

    # --- connections ----------------------------------------------------------------------

    def _connect(self, busy_timeout_ms: int = 0) -> sqlite3.Connection:
        # Working connections have no SQLite busy handler: its sleeps start at 1 ms and grow,
        # far longer than our transactions last, so two busy workers would mostly sleep.
        # ``_begin`` retries on a finer schedule instead. WAL readers never wait for writers.
        conn = sqlite3.connect(
            self.path,
            timeout=self.busy_timeout_ms / 1000,
            isolation_level=None,
            check_same_thread=False,
        )
        # Opening reads the schema, which waits out another connection's close (the last one
        # to close checkpoints the WAL under an exclusive lock); only then drop the handler.
        conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        conn.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
        with self._conns_lock:
            self._conns.add(conn)
        return conn

    def _begin(self, conn: sqlite3.Connection) -> None:
        """``BEGIN IMMEDIATE``, retried every 50 µs-2 ms until ``busy_timeout_ms``."""
        try:
            conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc):
                raise
        deadline = time.monotonic() + self.busy_timeout_ms / 1000
        delay = 50e-6
        while True:
            time.sleep(delay)
            try:
                conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or time.monotonic() > deadline:
                    raise
            delay = min(delay * 1.5, 0.002)

    def conn(self) -> sqlite3.Connection:
        """This thread's connection; reopened if the file was deleted or replaced under us."""
        local = self.local
        conn: sqlite3.Connection | None = getattr(local, "conn", None)
        inode = self._inode_now()
        if inode is None or inode != self._inode:
            with self._open_lock:
                if inode is None or inode != self._inode:
                    if self._inode is not None:
                        log.error(
                            "SQLite file %s was deleted or replaced under this process; "
                            "reopening it (jobs stored in the old file are gone with it)",
                            self.path,
                        )
                    self._setup_file()
                    self._generation += 1
        if conn is None or local.generation != self._generation:
            if conn is not None:
                conn.close()
                with self._conns_lock:
                    self._conns.discard(conn)
            conn = self._connect()
            local.conn = conn
            local.generation = self._generation
        return conn

    def _inode_now(self) -> int | None:
        """The file's inode; None if there is no file (yet). A path that cannot hold one (a
        part of it is a file, a directory we may not search) is a permanent ``BrokerError``."""
        try:
            return os.stat(self.path).st_ino
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._cannot_open(_path_problem(self.path, exc)) from None

    def _cannot_open(self, why: str) -> BrokerError:
        return BrokerError(f"cannot open SQLite database {self.path}: {why}", permanent=True)

    def directory(self) -> str:
        return os.path.dirname(os.path.abspath(self.path))

    def _setup_file(self) -> None:
        """Create the schema (idempotent) and switch the file to WAL. Caller holds the lock."""
        directory = self.directory()
        if not os.path.isdir(directory):
            raise self._cannot_open(f"{directory} does not exist")
        if os.path.isdir(self.path):
            raise self._cannot_open("it is a directory")
        with self.errors():
            conn = self._connect(self.busy_timeout_ms)
            try:
                # when two processes create the file at once, switching it to WAL fails with
                # "locked" at once (no busy handler on that path): retry within the busy timeout
                deadline = time.monotonic() + self.busy_timeout_ms / 1000
                while True:
                    try:
                        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                        break
                    except sqlite3.OperationalError as exc:
                        if "locked" not in str(exc) or time.monotonic() > deadline:
                            raise
                        time.sleep(0.005)
                if mode != "wal":
                    raise BrokerError(f"SQLite database {self.path} could not switch to WAL mode")
                (version,) = conn.execute("PRAGMA user_version").fetchone()
                if version < SCHEMA_VERSION:
                    upgrade(conn)
            finally:
                conn.close()
        self._inode = os.stat(self.path).st_ino

    @contextlib.contextmanager
    def errors(self) -> Iterator[None]:
        """SQLite's errors as taskmill's: locked too long or a disk that failed is
        ``BrokerUnavailableError`` (worth another try), a read-only file or directory a
        permanent ``BrokerError``."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            text = str(exc)
            if "locked" in text or "busy" in text:
                raise BrokerUnavailableError(
                    f"SQLite database {self.path} stayed locked for more than "
                    f"{self.busy_timeout_ms} ms ({text}); nothing was written"
                ) from exc
            if "readonly" in text or "read-only" in text:
                # SQLite keeps a connection opened on a read-only file read-only for good:
                # drop it, so a retry after the file is writable again reopens it writable
                self.close_thread()
                raise BrokerError(
                    f"SQLite database {self.path} is read-only ({text}); nothing was written",
                    permanent=True,
                ) from exc
            if "unable to open" in text and not os.access(self.directory(), os.W_OK):
                raise BrokerError(
                    f"SQLite database {self.path}: directory {self.directory()} is not "
                    "writable: SQLite needs to create the -wal and -shm files beside the "
                    f"database ({text})",
                    permanent=True,
                ) from exc
            if "unable to open" in text or "disk I/O" in text:
                raise BrokerUnavailableError(f"SQLite database {self.path}: {text}") from exc
            raise BrokerError(f"SQLite database {self.path}: {text}") from exc
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.IntegrityError):
                raise
            raise BrokerError(f"SQLite database {self.path}: {exc}") from exc

    @contextlib.contextmanager
    def write(self, conn: sqlite3.Connection | None = None) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``) on ``conn`` or this thread's."""
        with self.errors():
            conn = conn or self.conn()
            self._begin(conn)
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[sqlite3.Connection]:
        """Reads that see one state of the file (a read transaction)."""
        with self.errors():
            conn = self.conn()
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("COMMIT")

    def read(self) -> sqlite3.Connection:
        """This thread's connection, for one read (WAL: it never waits for writers)."""
        return self.conn()

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """The rows of one read."""
        with self.errors():
            return self.read().execute(sql, params).fetchall()

    def write_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """One statement for each of ``rows``, in one write transaction."""
        with self.write() as conn:
            conn.executemany(sql, rows)

    # --- the thread of async callers ------------------------------------------------------

    def start(self) -> None:
        """Open this thread's connection (creating or upgrading the file) and the thread."""
        with self.errors():
            self.conn()
        if self._executor is None:
            # not a ThreadPoolExecutor: closing from an atexit hook must still reach it
            self._executor = DaemonThreads(1, "taskmill-sqlite")

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn`` on the database's thread."""
        if self._executor is None:
            raise BrokerError("the SQLite broker is not open")
        return await self._executor.run(lambda: fn(*args, **kwargs))

    async def close(self) -> None:
        """Close every thread's connection and stop the thread. A thread that uses the
        database again reconnects."""
        if self._executor is not None:
            executor, self._executor = self._executor, None
            await executor.run(self.close_thread)
            executor.shutdown(wait=True)
        self.close_thread()
        with self._conns_lock:
            others, self._conns = list(self._conns), set()
        for conn in others:  # producer threads' connections: sqlite3 allows a close from here
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self._generation += 1

    def close_thread(self) -> None:
        conn = getattr(self.local, "conn", None)
        if conn is not None:
            conn.close()
            self.local.conn = None


def _path_problem(path: str, exc: OSError) -> str:
    """Why ``path`` cannot be a file: which part of it is a file, say, rather than only the
    OS's "Not a directory"."""
    if isinstance(exc, NotADirectoryError):
        for parent in Path(path).absolute().parents:  # the nearest first
            if parent.exists() and not parent.is_dir():
                return f"{parent} is a file, not a directory"
    return exc.strerror or str(exc)


class _OnDatabase(Protocol):
    @property
    def _db(self) -> Database: ...


S = TypeVar("S", bound=_OnDatabase)


def on_database_thread(
    method: Callable[Concatenate[S, P], T],
) -> Callable[Concatenate[S, P], Coroutine[Any, Any, T]]:
    """An operation written once, as blocking code on the calling thread's connection, made a
    coroutine that runs it on the database's thread (``Database.run``)."""

    @functools.wraps(method)
    async def run(self: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._db.run(method, self, *args, **kwargs)

    return run
