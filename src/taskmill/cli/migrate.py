"""taskmill migrate: create or upgrade the broker's storage now, rather than on first use."""

from __future__ import annotations

import click

from taskmill.brokers.base import Broker
from taskmill.cli._base import Env, cli, target_options


def _postgres(broker: Broker) -> bool:
    # imported only for a PostgreSQL URL: the module needs psycopg, an optional dependency
    if not broker.url.lower().startswith(("postgresql:", "postgres:")):
        return False
    from taskmill.brokers.postgres import PostgresBroker

    return isinstance(broker, PostgresBroker)


@cli.command()
@click.option(
    "--to",
    "target",
    type=click.IntRange(min=1),
    metavar="VERSION",
    help="Stop at this schema version (default: the latest).",
)
@target_options
@click.pass_obj
def migrate(env: Env, target: int | None) -> None:
    """Create or upgrade the broker's tables and print what was applied.

    PostgreSQL: applies the versioned migrations the schema lacks, in one transaction, under a
    lock (two at once are safe). Brokers migrate themselves on first use unless the URL says
    migrate=false; this command lets a deploy step do it instead. SQLite and Redis need
    nothing."""
    app = env.app()
    broker = app.broker
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
