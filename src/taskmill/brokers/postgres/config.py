"""What a ``postgresql://`` URL says, and the named queries of ``sql/postgres.sql`` for a schema."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from taskmill.brokers._sql import load_queries
from taskmill.errors import ConfigurationError
from taskmill.urls import redact_url

DEFAULT_SCHEMA = "taskmill"
_SCHEMA_RE = re.compile(r"[a-z_][a-z0-9_]{0,47}")  # + "_wake" stays within 63 bytes
_QUERIES = load_queries("postgres.sql")
READ_QUERIES = (
    "now", "get", "get_many", "find_jobs_enqueued", "find_jobs_finished", "count_jobs", "stats",
    "finished_per_minute", "count_queued", "count_scheduled", "count_running",
    "estimate_finished", "table_rows", "finished_estimates",
    "workers", "next_due", "schedule_marks",
    "get_workflow", "running_workflows", "queue_depth",
)  # fmt: skip
"""Queries that change nothing: a timeout in one needs no word on writes under way."""


@dataclass(frozen=True, slots=True)
class PostgresConfig:
    """What a ``postgresql://`` URL says: libpq's connection string and taskmill's options."""

    conninfo: str
    """The URL for libpq, without taskmill's options (libpq's own, e.g. sslmode, stay)."""
    where: str
    """host:port/database, for messages (never the password)."""
    schema: str = DEFAULT_SCHEMA
    migrate: bool = True
    unavailable_after_s: float = 5.0
    pool_size: int = 8
    snapshot_warn_s: float = 30.0
    """A transaction of this database holding a snapshot longer than this is warned about
    (``PostgresBroker.health_warnings``): vacuum removes nothing newer than it."""


def _bool_option(options: dict[str, str], name: str, default: bool, url: str) -> bool:
    raw = options.pop(name, None)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ConfigurationError(f"{name} in {redact_url(url)!r} must be true or false, not {raw!r}")


def parse_url(url: str) -> PostgresConfig:
    """``postgresql://user:pass@host:port/db?schema=s&migrate=false&unavailable_after_s=5``
    (also ``pool_size=8``, ``snapshot_warn_s=30``).

    >>> parse_url("postgres://u@db.internal/app?schema=jobs&sslmode=require").schema
    'jobs'
    """
    shown = redact_url(url)  # for messages: never the password
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigurationError(f"not a PostgreSQL URL: {shown!r}")
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    schema = options.pop("schema", DEFAULT_SCHEMA)
    if not _SCHEMA_RE.fullmatch(schema):
        raise ConfigurationError(
            f"schema in {shown!r} must be a lowercase identifier of at most 48 characters "
            f"(letters, digits, _), not {schema!r}"
        )
    migrate = _bool_option(options, "migrate", True, url)
    try:
        unavailable_after_s = float(options.pop("unavailable_after_s", "5"))
        pool_size = int(options.pop("pool_size", "8"))
        snapshot_warn_s = float(options.pop("snapshot_warn_s", "30"))
    except ValueError:
        raise ConfigurationError(
            f"unavailable_after_s, pool_size and snapshot_warn_s in {shown!r} must be numbers"
        ) from None
    if not unavailable_after_s > 0 or pool_size < 2 or not snapshot_warn_s > 0:
        raise ConfigurationError(
            f"{shown!r}: need unavailable_after_s > 0, pool_size >= 2 and snapshot_warn_s > 0"
        )
    # named in pg_stat_activity (and what an operator's pg_terminate_backend filters on)
    options.setdefault("application_name", "taskmill")
    # libpq's connect timeout is whole seconds, at least 2
    options.setdefault("connect_timeout", str(max(2, math.ceil(min(unavailable_after_s, 10)))))
    # libpq decodes %XX but not "+": spaces must be %20 (e.g. options=-c%20statement_timeout=5s)
    query = urlencode(options, quote_via=quote)
    conninfo = urlunsplit(("postgresql", parts.netloc, parts.path, query, ""))
    host = parts.hostname or "localhost"
    where = f"{host}:{parts.port or 5432}{parts.path or '/'}"
    return PostgresConfig(
        conninfo, where, schema, migrate, unavailable_after_s, pool_size, snapshot_warn_s
    )


def queries(schema: str) -> dict[str, str]:
    """The named queries with ``{schema}`` and ``{columns}`` filled in, and ``enqueue`` in its
    two forms: ``enqueue_many`` (arrays) and ``enqueue_one`` (one row)."""
    texts = dict(_QUERIES)
    enqueue = texts.pop("enqueue")
    texts["enqueue_many"] = enqueue.replace("{rows}", texts.pop("enqueue_rows"))
    texts["enqueue_one"] = enqueue.replace("{rows}", texts.pop("enqueue_row"))
    listing = texts.pop("find_jobs_filter")
    for name in ("find_jobs_enqueued", "find_jobs_finished", "count_jobs", "count_queued",
                 "count_scheduled", "count_running", "estimate_finished"):  # fmt: skip
        texts[name] = texts[name].replace("{filter}", f"({listing})")
    columns = texts["columns"]
    return {
        name: text.replace("{columns}", columns).replace("{schema}", schema)
        for name, text in texts.items()
    }
