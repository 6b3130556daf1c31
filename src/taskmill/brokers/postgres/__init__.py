"""The PostgreSQL broker: ``App("postgresql://user:pass@host:5432/db?schema=taskmill")``.

Jobs live in ``{schema}.jobs`` (schema ``taskmill`` by default), created and upgraded by the
versioned migrations in ``sql/postgres_migrations/`` on first use (or by ``taskmill migrate``).
Every query is a named query in ``sql/postgres.sql``; times come from the database's clock.

The package's modules: ``config`` (the URL, the named queries), ``connection`` (pools per event
loop and for blocking callers, the broker's I/O loop, retries, errors), ``listener``
(``LISTEN`` for wake-ups and live events), ``migrations`` (the versioned schema) and ``broker``
(the operations).
"""

from __future__ import annotations

from taskmill.brokers.postgres.broker import PostgresBroker
from taskmill.brokers.postgres.config import DEFAULT_SCHEMA, PostgresConfig, parse_url, queries
from taskmill.brokers.postgres.migrations import (
    Migration,
    apply_migrations,
    migrations,
    schema_version,
)

__all__ = [
    "DEFAULT_SCHEMA",
    "Migration",
    "PostgresBroker",
    "PostgresConfig",
    "apply_migrations",
    "migrations",
    "parse_url",
    "queries",
    "schema_version",
]
