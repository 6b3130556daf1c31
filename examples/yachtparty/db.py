"""The app's own tables (users, messages, the action log) and the queries on them.

The seed's ``agent_tasks`` table is gone: a task is a taskmill job. What stays is the data the
agents work on and ``agent_actions_log``, the audit trail the seed wrote after each task, now
written by taskmill hooks (``tasks.py``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from taskmill.brokers.postgres import parse_url

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id text PRIMARY KEY,
    name text NOT NULL,
    profile jsonb NOT NULL DEFAULT '{}',
    conversation_paused boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now()
);
-- Deferred, as Django declares its foreign keys on PostgreSQL: a message for an unknown user
-- fails at COMMIT, after the message and its job were both written (and both go).
CREATE TABLE IF NOT EXISTS messages (
    id bigserial PRIMARY KEY,
    user_id text NOT NULL REFERENCES users (id) DEFERRABLE INITIALLY DEFERRED,
    direction text NOT NULL CHECK (direction IN ('inbound', 'outbound')),
    body text NOT NULL,
    -- an outbound message written by a job: once per job, however many times it runs
    job_id text UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS messages_by_user ON messages (user_id, created_at);
CREATE TABLE IF NOT EXISTS agent_actions_log (
    id bigserial PRIMARY KEY,
    agent_type text NOT NULL DEFAULT 'task_processor',
    action_type text NOT NULL,
    outcome text NOT NULL CHECK (outcome IN ('succeeded', 'retrying', 'failed')),
    user_id text,
    context_id text NOT NULL,
    context_type text NOT NULL DEFAULT 'agent_task',
    attempt integer NOT NULL,
    scheduled_for timestamptz NOT NULL,
    started_at timestamptz,
    latency_ms double precision,
    wait_ms double precision,
    input_data jsonb NOT NULL,
    output_data jsonb,
    error text,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS agent_actions_by_context ON agent_actions_log (context_id, id);
"""

# one lock for every process that may create the tables at once (web and worker start together)
SCHEMA_LOCK = 0x59616368  # "Yach"


class UnknownUserError(LookupError):
    """No user has this id."""


class Database:
    """A small connection pool on the app's database (the one taskmill's jobs live in)."""

    def __init__(self, url: str, *, max_size: int = 4) -> None:
        # the taskmill URL may carry its own options (?schema=...); psycopg gets the rest
        self.conninfo = parse_url(url).conninfo
        self._pool = ConnectionPool(
            self.conninfo, min_size=1, max_size=max_size, open=False, kwargs={"autocommit": True}
        )
        self._opened = False
        self._opening = threading.Lock()  # hooks run on several threads: open the pool once

    def open(self) -> None:
        with self._opening:
            if not self._opened:
                self._pool.open(wait=True, timeout=30)
                self._opened = True

    def close(self) -> None:
        with self._opening:
            self._pool.close()
            self._opened = False

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection in autocommit mode: wrap writes that belong together in
        ``with conn.transaction():``."""
        self.open()
        with self._pool.connection() as conn:
            yield conn

    def create_tables(self) -> None:
        with self.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            conn.execute(SCHEMA)

    # --- users and messages ---------------------------------------------------------------

    def add_user(self, user_id: str, name: str) -> bool:
        """Add a user; False if one with this id exists already."""
        with self.connection() as conn:
            cur = conn.execute(
                "INSERT INTO users (id, name) VALUES (%s, %s) ON CONFLICT (id) DO NOTHING",
                (user_id, name),
            )
            return cur.rowcount == 1

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        with self.connection() as conn:
            return conn.cursor(row_factory=dict_row).execute(sql, params).fetchall()

    def user(self, user_id: str) -> dict[str, Any]:
        """A user, with their messages."""
        users = self.rows(
            "SELECT id, name, profile, conversation_paused FROM users WHERE id = %s", (user_id,)
        )
        if not users:
            raise UnknownUserError(f"no user {user_id!r}")
        users[0]["messages"] = self.rows(
            "SELECT direction, body, job_id FROM messages WHERE user_id = %s ORDER BY id",
            (user_id,),
        )
        return users[0]

    # --- the action log -----------------------------------------------------------------------

    def log_action(self, entry: dict[str, Any]) -> None:
        """One row of ``agent_actions_log``; ``input_data`` and ``output_data`` as JSON."""
        row = dict(entry)
        row["input_data"] = Jsonb(row["input_data"])
        row["output_data"] = Jsonb(row.get("output_data"))
        with self.connection() as conn:
            conn.execute(
                "INSERT INTO agent_actions_log (action_type, outcome, user_id, context_id, "
                "attempt, scheduled_for, started_at, latency_ms, wait_ms, input_data, "
                "output_data, error) VALUES (%(action_type)s, %(outcome)s, %(user_id)s, "
                "%(context_id)s, %(attempt)s, to_timestamp(%(scheduled_for)s), "
                "to_timestamp(%(started_at)s), %(latency_ms)s, %(wait_ms)s, %(input_data)s, "
                "%(output_data)s, %(error)s)",
                row,
            )

    def actions(self, context_id: str) -> list[dict[str, Any]]:
        """The log rows of one task (job), oldest first; times as Unix seconds."""
        return self.rows(
            "SELECT action_type, outcome, attempt, latency_ms, wait_ms, error, output_data, "
            "extract(epoch FROM scheduled_for)::float8 AS scheduled_for, "
            "extract(epoch FROM started_at)::float8 AS started_at, "
            "extract(epoch FROM created_at)::float8 AS logged_at "
            "FROM agent_actions_log WHERE context_id = %s ORDER BY id",
            (context_id,),
        )

    def action_stats(self) -> list[dict[str, Any]]:
        """Per action type and outcome: how many, and the latency's median, p95 and max."""
        return self.rows(
            "SELECT action_type, outcome, count(*) AS n, "
            "percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) AS p50_ms, "
            "percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms) AS p95_ms, "
            "max(latency_ms) AS max_ms, "
            "percentile_cont(0.5) WITHIN GROUP (ORDER BY wait_ms) AS wait_p50_ms, "
            "max(created_at) AS last_at "
            "FROM agent_actions_log GROUP BY action_type, outcome ORDER BY 1, 2"
        )
