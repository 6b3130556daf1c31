"""The default broker: one SQLite file in WAL mode, shared by every process on the machine.

Each operation is one short write transaction (``BEGIN IMMEDIATE``) on a connection owned by a
single thread. Async callers reach it through a one-thread executor per broker, so a lock wait
never blocks the event loop; synchronous producers use a connection of their own thread.
Idle workers are woken by Unix datagrams, with a cheap ``PRAGMA data_version`` check as the
fallback for writers that cannot notify (a caller's own transaction, another tool).

The package's modules: ``connection`` (the URL, a connection per thread, transactions, errors,
the thread of async callers), ``wakeup`` (datagram wake-ups and the fallback), ``schema``
(named queries, the schema's version and its upgrade) and ``broker`` (the operations).
"""

from __future__ import annotations

from taskmill.brokers.sqlite.broker import SQLiteBroker
from taskmill.brokers.sqlite.connection import Database, SQLiteOptions, options_from_url, parse_url
from taskmill.brokers.sqlite.schema import COLUMNS, SCHEMA_VERSION, Q
from taskmill.brokers.sqlite.wakeup import channel_dir

__all__ = [
    "COLUMNS",
    "SCHEMA_VERSION",
    "Database",
    "Q",
    "SQLiteBroker",
    "SQLiteOptions",
    "channel_dir",
    "options_from_url",
    "parse_url",
]
