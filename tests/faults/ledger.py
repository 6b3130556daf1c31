"""The ledger: what was enqueued, what ran and which faults were injected, in an SQLite file of
its own (WAL, ``synchronous=FULL``), independent of the broker under test.

Every process opens its own connection per write (the harness in the test process, the job
body in each worker process); a row is durable once its write returns, so a process killed
right after the write leaves it behind.
"""

from __future__ import annotations

import os
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

LEDGER_ENV = "FAULTS_LEDGER"
"""The environment variable naming the ledger file for worker processes."""

INCARNATION = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
"""This process's identity: the pid plus a random part, new at each start (pids are reused)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS enqueues (
    seq INTEGER PRIMARY KEY, job_id TEXT NOT NULL, t REAL NOT NULL, outcome TEXT NOT NULL,
    error TEXT);
CREATE TABLE IF NOT EXISTS executions (
    seq INTEGER PRIMARY KEY, job_id TEXT NOT NULL, attempt INTEGER NOT NULL,
    incarnation TEXT NOT NULL, pid INTEGER NOT NULL, t_start REAL NOT NULL, t_end REAL);
CREATE TABLE IF NOT EXISTS retries (
    seq INTEGER PRIMARY KEY, job_id TEXT NOT NULL, attempt INTEGER NOT NULL, t REAL NOT NULL,
    delay_s REAL NOT NULL);
CREATE TABLE IF NOT EXISTS faults (
    seq INTEGER PRIMARY KEY, t REAL NOT NULL, kind TEXT NOT NULL, pid INTEGER NOT NULL,
    target TEXT NOT NULL, t_end REAL);
"""


class Outcome(StrEnum):
    OK = "ok"
    """The broker acknowledged the enqueue."""
    ERROR = "error"
    """The call failed in a way that says the job was not stored."""
    UNKNOWN = "unknown"
    """The call failed without saying whether the job was stored (a timeout, a lost reply)."""
    EXISTING = "existing"
    """The broker acknowledged a send that repeated an earlier attempt's job id and said the
    job was stored already: that earlier attempt (of outcome ``unknown``) did commit."""


@dataclass(frozen=True)
class Enqueue:
    job_id: str
    t: float
    outcome: Outcome
    error: str | None = None


@dataclass(frozen=True)
class Execution:
    job_id: str
    attempt: int
    incarnation: str
    pid: int
    t_start: float
    t_end: float | None
    """None: the body never returned (its process died, or it raised)."""


@dataclass(frozen=True)
class Retry:
    """A worker decided to retry attempt ``attempt`` of ``job_id`` at ``t`` (its clock),
    ``delay_s`` later (from its ``on_retry`` hook): the retry is due at ``t + delay_s``."""

    job_id: str
    attempt: int
    t: float
    delay_s: float

    @property
    def due(self) -> float:
        return self.t + self.delay_s


@dataclass(frozen=True)
class Fault:
    t: float
    kind: str
    """What was done, e.g. ``kill -9``."""
    pid: int
    """The process it was done to."""
    target: str = ""
    """What that process was (``worker child``...)."""
    t_end: float | None = None
    """For a fault that lasts (a broker down, replies dropped): when it ended. None: a
    moment (a kill)."""


@dataclass(frozen=True)
class Records:
    """Everything a ledger holds, read at once."""

    enqueues: list[Enqueue]
    executions: list[Execution]
    faults: list[Fault]
    retries: list[Retry] = field(default_factory=list)


class Ledger:
    """The ledger file at ``path``; created (with its tables) on first open."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        with self._connect() as conn:
            conn.executescript(_SCHEMA)
        conn.close()

    @classmethod
    def from_env(cls) -> Ledger:
        return cls(os.environ[LEDGER_ENV])

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    def _write(self, sql: str, params: tuple[object, ...]) -> int:
        conn = self._connect()
        try:
            cursor = conn.execute(sql, params)
            return cursor.lastrowid or 0
        finally:
            conn.close()

    def record_enqueue(
        self, job_id: str, outcome: Outcome, error: str | None = None, t: float | None = None
    ) -> None:
        self._write(
            "INSERT INTO enqueues (job_id, t, outcome, error) VALUES (?, ?, ?, ?)",
            (job_id, time.time() if t is None else t, str(outcome), error),
        )

    def record_enqueues(self, enqueues: list[Enqueue]) -> None:
        """Record many enqueue attempts in one transaction."""
        conn = self._connect()
        try:
            with conn:
                conn.execute("BEGIN")
                conn.executemany(
                    "INSERT INTO enqueues (job_id, t, outcome, error) VALUES (?, ?, ?, ?)",
                    [(e.job_id, e.t, str(e.outcome), e.error) for e in enqueues],
                )
        finally:
            conn.close()

    def start_execution(self, job_id: str, attempt: int) -> int:
        """Record that this process starts running ``job_id``; the row's number for ``end``."""
        return self._write(
            "INSERT INTO executions (job_id, attempt, incarnation, pid, t_start)"
            " VALUES (?, ?, ?, ?, ?)",
            (job_id, attempt, INCARNATION, os.getpid(), time.time()),
        )

    def record_retry(self, job_id: str, attempt: int, delay_s: float) -> None:
        self._write(
            "INSERT INTO retries (job_id, attempt, t, delay_s) VALUES (?, ?, ?, ?)",
            (job_id, attempt, time.time(), delay_s),
        )

    def end_execution(self, seq: int) -> None:
        self._write("UPDATE executions SET t_end = ? WHERE seq = ?", (time.time(), seq))

    def record_fault(
        self,
        kind: str,
        pid: int,
        target: str = "",
        t: float | None = None,
        t_end: float | None = None,
    ) -> None:
        self._write(
            "INSERT INTO faults (t, kind, pid, target, t_end) VALUES (?, ?, ?, ?, ?)",
            (time.time() if t is None else t, kind, pid, target, t_end),
        )

    def read(self) -> Records:
        conn = self._connect()
        try:
            enqueues = [
                Enqueue(r[0], r[1], Outcome(r[2]), r[3])
                for r in conn.execute("SELECT job_id, t, outcome, error FROM enqueues ORDER BY seq")
            ]
            executions = [
                Execution(*r)
                for r in conn.execute(
                    "SELECT job_id, attempt, incarnation, pid, t_start, t_end FROM executions"
                    " ORDER BY seq"
                )
            ]
            faults = [
                Fault(*r)
                for r in conn.execute("SELECT t, kind, pid, target, t_end FROM faults ORDER BY seq")
            ]
            retries = [
                Retry(*r)
                for r in conn.execute(
                    "SELECT job_id, attempt, t, delay_s FROM retries ORDER BY seq"
                )
            ]
        finally:
            conn.close()
        return Records(enqueues, executions, faults, retries)
