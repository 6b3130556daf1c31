"""taskmill queues (with pause/resume), workers and purge."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click
from rich.table import Table
from rich.text import Text

from taskmill.brokers.base import Broker
from taskmill.cli._base import (
    _STATE_STYLE,
    _STATES,
    LOST_AFTER_HEARTBEATS,
    Env,
    age,
    broker_call,
    cli,
    dumps,
    target_options,
)
from taskmill.job import QueueStats, WorkerInfo

if TYPE_CHECKING:
    pass

# --- queues -------------------------------------------------------------------------------------


@cli.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@target_options
@click.pass_context
def queues(ctx: click.Context, as_json: bool) -> None:
    """Show queues: jobs per state, the oldest waiting job's age, paused or not.

    'taskmill queues pause Q' and 'taskmill queues resume Q' stop and restart claiming."""
    if ctx.invoked_subcommand is not None:
        return
    env = ctx.ensure_object(Env)
    app = env.app()
    stats = broker_call(app, lambda b: b.stats())
    if env.has_app:  # the app's queues with nothing in them yet are still worth a row
        seen = {s.queue for s in stats}
        stats += [
            QueueStats(queue=q, counts=dict.fromkeys(_STATES, 0))
            for q in app.queues()
            if q not in seen
        ]
        stats.sort(key=lambda s: s.queue)
    if as_json:
        click.echo(
            dumps(
                [
                    {
                        "queue": s.queue,
                        "counts": s.counts,
                        "oldest_waiting_s": s.oldest_waiting_s,
                        "paused": s.paused,
                    }
                    for s in stats
                ],
                indent=2,
            )
        )
        return
    if not stats:
        env.err.print("no queues yet", highlight=False)
        return
    table = Table(title="queues", title_justify="left")
    table.add_column("queue")
    for st in _STATES:
        table.add_column(st, justify="right", style=_STATE_STYLE[st])
    table.add_column("oldest waiting", justify="right")
    table.add_column("paused")
    for s in stats:
        table.add_row(
            Text(s.queue),
            *(str(s.counts.get(st, 0)) for st in _STATES),
            age(s.oldest_waiting_s),
            Text("paused", style="bold red") if s.paused else "",
        )
    env.out.print(table)


@queues.command("pause")
@click.argument("queue")
@target_options
@click.pass_obj
def queues_pause(env: Env, queue: str) -> None:
    """Stop workers claiming jobs of QUEUE (running jobs go on; sending still works)."""
    app = env.app()
    broker_call(app, lambda b: b.pause(queue, True))
    click.echo(f"queue {queue} paused")


@queues.command("resume")
@click.argument("queue")
@target_options
@click.pass_obj
def queues_resume(env: Env, queue: str) -> None:
    """Let workers claim from QUEUE again."""
    app = env.app()
    broker_call(app, lambda b: b.pause(queue, False))
    click.echo(f"queue {queue} resumed")


# --- workers ------------------------------------------------------------------------------------


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@target_options
@click.pass_obj
def workers(env: Env, as_json: bool) -> None:
    """List worker processes. "lost": no heartbeat for 3 intervals, and no sign-off."""
    from taskmill.worker.names import name_of

    app = env.app()

    async def fetch(b: Broker) -> tuple[list[WorkerInfo], float]:
        return await b.list_workers(), await b.now()

    found, now = broker_call(app, fetch)
    lost_after = LOST_AFTER_HEARTBEATS * app.settings.effective_heartbeat_s
    rows = [
        {
            "id": w.id,
            "name": name_of(w.id),
            "host": w.host,
            "pid": w.pid,
            "queues": w.queues,
            "concurrency": w.concurrency,
            "running": len(w.running),
            "started_at": w.started_at,
            "heartbeat_age_s": round(now - w.heartbeat_at, 3),
            "status": "lost" if now - w.heartbeat_at > lost_after else "alive",
        }
        for w in found
    ]
    if as_json:
        click.echo(dumps(rows, indent=2))
        return
    if not rows:
        env.err.print("no workers registered", highlight=False)
        return
    table = Table(title="workers", title_justify="left")
    for name in ("id", "host", "pid", "queues", "slots", "running", "up", "heartbeat", "status"):
        table.add_column(name, no_wrap=name == "id", justify="right" if name == "pid" else "left")
    for w, row in zip(found, rows, strict=True):
        lost = row["status"] == "lost"
        table.add_row(
            w.id,
            Text(w.host),
            str(w.pid),
            Text(",".join(w.queues)),
            str(w.concurrency),
            str(len(w.running)),
            age(now - w.started_at),
            age(now - w.heartbeat_at) + " ago",
            Text("lost", style="bold red") if lost else Text("alive", style="green"),
        )
    env.out.print(table)


# --- purge --------------------------------------------------------------------------------------


@cli.command()
@click.argument("queue")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@target_options
@click.pass_obj
def purge(env: Env, queue: str, yes: bool) -> None:
    """Delete the scheduled and queued jobs of QUEUE (running and finished jobs stay)."""
    app = env.app()
    if not yes:
        stats = {s.queue: s for s in broker_call(app, lambda b: b.stats())}
        s = stats.get(queue)
        waiting = 0 if s is None else s.counts.get("scheduled", 0) + s.counts.get("queued", 0)
        click.confirm(f"Delete {waiting} waiting job(s) of queue {queue!r}?", abort=True, err=True)
    n = broker_call(app, lambda b: b.purge(queue))
    click.echo(f"purged {n} job(s) from queue {queue}")
