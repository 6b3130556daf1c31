"""taskmill migrate: create or upgrade the broker's storage now, rather than on first use."""

from __future__ import annotations

from typing import Any

import click

from taskmill.brokers.base import Broker
from taskmill.cli._base import Env, cli, target_options


def _postgres(broker: Broker) -> bool:
    # imported only for a PostgreSQL URL: the module needs psycopg, an optional dependency
    if not broker.url.lower().startswith(("postgresql:", "postgres:")):
        return False
    from taskmill.brokers.postgres import PostgresBroker

    return isinstance(broker, PostgresBroker)


def _nats(broker: Broker) -> bool:
    # imported only for a nats:// URL: the module needs nats-py, an optional dependency
    if not broker.url.lower().startswith("nats:"):
        return False
    from taskmill.brokers.nats import NatsBroker

    return isinstance(broker, NatsBroker)


@cli.command()
@click.option(
    "--to",
    "target",
    type=click.IntRange(min=1),
    metavar="VERSION",
    help="Stop at this schema version (default: the latest; PostgreSQL only).",
)
@target_options
@click.pass_obj
def migrate(env: Env, target: int | None) -> None:
    """Create or upgrade the broker's storage and print what was applied or is there.

    PostgreSQL: applies the versioned migrations the schema lacks, in one transaction, under a
    lock (two at once are safe). NATS: creates the streams and key-value buckets that are
    missing, with taskmill's explicit settings (an existing one is left as it is), and prints
    one line per stream as the server has it. Brokers set up their storage on first use unless
    the URL says migrate=false (PostgreSQL); this command lets a deploy step do it instead, and
    shows what a NATS server holds. SQLite and Redis need nothing."""
    app = env.app()
    broker = app.broker
    if _nats(broker):
        if target is not None:
            raise click.UsageError("--to is for PostgreSQL's schema versions; NATS has none")
        _migrate_nats(broker)
        return
    if not _postgres(broker):
        scheme = broker.url.split(":", 1)[0]
        click.echo(f"nothing to migrate: the {scheme} broker sets up its storage on first use")
        return
    from taskmill.brokers.postgres import PostgresBroker

    assert isinstance(broker, PostgresBroker)
    applied = broker.migrate_blocking(target)
    where = f"schema {broker.schema} at {broker.config.where}"
    for migration in applied:
        click.echo(f"applied {migration.name}")
    version = broker.schema_version_blocking()
    if applied:
        click.echo(f"{where} is at version {version}")
    else:
        click.echo(f"{where} is up to date (version {version})")


def _migrate_nats(broker: Broker) -> None:
    from taskmill.brokers.nats import NatsBroker

    assert isinstance(broker, NatsBroker)
    streams = broker.storage_blocking()
    for stream in streams:
        click.echo(_stream_line(stream))
    click.echo(
        f"NATS at {broker.config.where}: {len(streams)} streams ready "
        f"(prefix {broker.config.prefix})"
    )


def _stream_line(s: dict[str, Any]) -> str:
    """One stream as the server has it, e.g. ``stream shop_dispatch: workqueue, file, 3
    replicas, subjects shop.d.> shop.s.> shop.t.>, duplicate window 120 s, no max age, scheduled
    messages, 0 messages``; a KV bucket's stream (``KV_<bucket>``) shows its history instead
    of its subjects."""
    name = str(s["stream"])
    replicas = int(s["replicas"] or 1)
    parts = [str(s["retention"]), str(s["storage"]), _count(replicas, "replica")]
    if name.startswith("KV_"):
        head = f"bucket {name[3:]} (stream {name})"
        parts.append(f"history {s['max_msgs_per_subject']}")
    else:
        head = f"stream {name}"
        parts.append("subjects " + " ".join(s["subjects"]))
    parts.append(f"duplicate window {s['duplicate_window_s']:g} s")
    max_age = float(s["max_age_s"] or 0)
    parts.append("no max age" if max_age <= 0 else f"max age {max_age:g} s")
    if not name.startswith("KV_"):
        parts.append("scheduled messages" if s["scheduled_messages"] else "no scheduled messages")
    parts.append(_count(int(s["messages"]), "message"))
    return f"{head}: " + ", ".join(parts)


def _count(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"
