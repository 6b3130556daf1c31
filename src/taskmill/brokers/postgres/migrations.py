"""The versioned schema: ``sql/postgres_migrations/NNNN_name.sql``, applied in order, each
once, in one transaction behind an advisory lock; and the checks of a schema's version."""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from importlib import resources

import psycopg
from psycopg.rows import TupleRow

from taskmill.brokers.postgres.config import queries

log = logging.getLogger("taskmill.brokers.postgres")

SyncConn = psycopg.Connection[TupleRow]

_LOCK_CLASS = 0x746D  # "tm": the first key of the migrations' advisory lock


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


@functools.cache
def migrations() -> tuple[Migration, ...]:
    """``sql/postgres_migrations/NNNN_name.sql``, in order (versions 1, 2, … with no gap)."""
    folder = resources.files("taskmill.brokers").joinpath("sql", "postgres_migrations")
    found = []
    for entry in folder.iterdir():
        match = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if match:
            found.append(Migration(int(match[1]), entry.name[:-4], entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise RuntimeError(f"taskmill's PostgreSQL migrations are not numbered 1..n: {found}")
    return tuple(found)


def apply_migrations(conn: SyncConn, schema: str, target: int | None = None) -> list[Migration]:
    """Bring ``schema`` up to ``target`` (default: the latest) in one transaction; the
    migrations that were applied. Concurrent migrators of one schema queue on an advisory
    lock, so the second finds the work done. ``conn`` must be in autocommit mode."""
    q = queries(schema)
    applied: list[Migration] = []
    with conn.transaction():
        conn.execute(q["migration_lock"], {"lock_class": _LOCK_CLASS, "schema": schema})
        exists = conn.execute(q["schema_exists"], {"schema": schema}).fetchone()
        if not (exists and exists[0]):
            conn.execute(q["create_schema"])
        conn.execute(q["version_table"])
        done = {row[0] for row in conn.execute(q["applied_versions"])}
        for migration in migrations():
            if target is not None and migration.version > target:
                break
            if migration.version in done:
                continue
            conn.execute(migration.sql.replace("{schema}", schema).encode())
            conn.execute(
                q["record_version"], {"version": migration.version, "name": migration.name}
            )
            applied.append(migration)
        newest = max(done, default=0)
    latest = migrations()[-1].version
    if newest > latest:
        log.warning(
            "PostgreSQL schema %s is at version %d, newer than this taskmill knows (%d): "
            "a newer taskmill migrated it; upgrade this one too",
            schema,
            newest,
            latest,
        )
    return applied


def schema_version(conn: SyncConn, schema: str) -> int | None:
    """The schema's migration version; None if taskmill's tables are not there."""
    q = queries(schema)
    row = conn.execute(q["version_table_exists"], {"table": f"{schema}.schema_version"}).fetchone()
    if row is None or not row[0]:
        return None
    version = conn.execute(q["current_version"]).fetchone()
    return None if version is None or version[0] is None else int(version[0])


def check_schema(conn: SyncConn, schema: str, where: str) -> str | None:
    """What is wrong with ``schema`` for this taskmill when it may not migrate it (None if
    it is current): missing, or at an older version."""
    version = schema_version(conn, schema)
    latest = migrations()[-1].version
    how = (
        "run `taskmill migrate --url URL` (with this URL) to create or upgrade it, or "
        "drop migrate=false from the URL to let taskmill do it on first use"
    )
    if version is None:
        return (
            f"PostgreSQL at {where} has no taskmill schema {schema!r} and the URL says "
            f"migrate=false: {how}"
        )
    if version < latest:
        return (
            f"PostgreSQL schema {schema!r} at {where} is at version {version}, this "
            f"taskmill needs {latest}, and the URL says migrate=false: {how}"
        )
    return None
