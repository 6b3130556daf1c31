"""The app's own data: the messages, their scores and topics (the seed kept them in
PostgreSQL). No job state is kept here: which step ran, failed or waits is taskmill's."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    key TEXT PRIMARY KEY,
    chat_id INTEGER NOT NULL,
    message_id INTEGER NOT NULL,
    author TEXT NOT NULL,
    text TEXT NOT NULL,
    received_at REAL NOT NULL,
    importance_score REAL,
    classification TEXT,
    factors TEXT,
    topics TEXT
)
"""


class MessageStore:
    """A SQLite file shared by the web process and the workers (WAL: they read while one
    writes)."""

    def __init__(self, path: str) -> None:
        self.path = path
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(SCHEMA)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30)
        db.row_factory = sqlite3.Row
        try:
            with db:  # a transaction: committed on success, rolled back on error
                yield db
        finally:
            db.close()

    def save(self, key: str, chat_id: int, message_id: int, author: str, text: str) -> bool:
        """Store a message; False if it was stored already (a webhook delivered twice)."""
        with self._connect() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO messages (key, chat_id, message_id, author, text, "
                "received_at) VALUES (?, ?, ?, ?, ?, ?)",
                (key, chat_id, message_id, author, text, time.time()),
            )
            return cursor.rowcount == 1

    def set_score(
        self, key: str, score: float, classification: str, factors: dict[str, float]
    ) -> None:
        with self._connect() as db:
            db.execute(
                "UPDATE messages SET importance_score = ?, classification = ?, factors = ? "
                "WHERE key = ?",
                (score, classification, json.dumps(factors), key),
            )

    def set_topics(self, key: str, topics: list[str]) -> None:
        with self._connect() as db:
            db.execute("UPDATE messages SET topics = ? WHERE key = ?", (json.dumps(topics), key))

    def get(self, key: str) -> dict[str, Any] | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM messages WHERE key = ?", (key,)).fetchone()
        return None if row is None else _message(row)

    def latest(self, limit: int = 50) -> list[dict[str, Any]]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT * FROM messages ORDER BY received_at DESC LIMIT ?", (limit,)
            ).fetchall()
        return [_message(row) for row in rows]


def _message(row: sqlite3.Row) -> dict[str, Any]:
    message = dict(row)
    for column in ("factors", "topics"):
        if message[column] is not None:
            message[column] = json.loads(message[column])
    return message
