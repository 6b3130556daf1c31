"""taskmill queues (with pause/resume), workers, tasks and purge, on the app's admin API."""

from __future__ import annotations

import click
from rich.table import Table
from rich.text import Text

from taskmill.admin import TaskInfo
from taskmill.cli._base import (
    _STATE_STYLE,
    _STATES,
    Env,
    age,
    cli,
    dumps,
    target_options,
)

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
    stats = env.app().stats()  # with an app, its queues with nothing in them yet have a row
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
    env.app().pause(queue)
    click.echo(f"queue {queue} paused")


@queues.command("resume")
@click.argument("queue")
@target_options
@click.pass_obj
def queues_resume(env: Env, queue: str) -> None:
    """Let workers claim from QUEUE again."""
    env.app().resume(queue)
    click.echo(f"queue {queue} resumed")


# --- workers ------------------------------------------------------------------------------------


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@target_options
@click.pass_obj
def workers(env: Env, as_json: bool) -> None:
    """List worker processes, with how many jobs each ran and how many raised. "lost": no
    heartbeat for 3 intervals, and no sign-off."""
    found = env.app().workers()
    from taskmill.worker.names import name_of

    rows = [
        {
            "id": w.id,
            "name": name_of(w.id),
            "host": w.host,
            "pid": w.pid,
            "queues": w.queues,
            "concurrency": w.concurrency,
            "running": len(w.running),
            "processed": w.processed,
            "failed": w.failed,
            "started_at": w.started_at,
            "heartbeat_age_s": round(w.heartbeat_age_s, 3),
            "status": "lost" if w.lost else "alive",
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
    names = ("id", "host", "pid", "queues", "slots", "running", "processed", "failed", "up",
             "heartbeat", "status")  # fmt: skip
    for name in names:
        right = name in ("pid", "slots", "running", "processed", "failed")
        table.add_column(name, no_wrap=name == "id", justify="right" if right else "left")
    for w in found:
        table.add_row(
            w.id,
            Text(w.host),
            str(w.pid),
            Text(",".join(w.queues)),
            str(w.concurrency),
            str(len(w.running)),
            str(w.processed),
            Text(str(w.failed), style="red" if w.failed else ""),
            age(w.heartbeat_at - w.started_at + w.heartbeat_age_s),
            age(w.heartbeat_age_s) + " ago",
            Text("lost", style="bold red") if w.lost else Text("alive", style="green"),
        )
    env.out.print(table)


# --- tasks --------------------------------------------------------------------------------------


def _schedule_text(info: TaskInfo) -> str:
    parts = []
    for s in info.schedules:
        what = f"cron {s.cron} ({s.tz})" if s.cron is not None else f"every {age(s.every_s)}"
        parts.append(what if s.name == info.name else f"{s.name}: {what}")
    return "; ".join(parts)


@cli.command()
@click.argument("app_arg", metavar="[APP]", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@target_options
@click.pass_obj
def tasks(env: Env, app_arg: str | None, as_json: bool) -> None:
    """List the app's registered tasks: queue, priority, retries, timeout, limits, schedules."""
    if app_arg:
        env.app_path = app_arg
    found = env.app(need_tasks=True).registered_tasks()
    if as_json:
        click.echo(
            dumps(
                [
                    {
                        "name": t.name,
                        "queue": t.queue,
                        "priority": t.priority,
                        "retries": t.retries,
                        "timeout_s": t.timeout_s,
                        "rate_limit": t.rate_limit,
                        "concurrency": t.concurrency,
                        "schedules": [
                            {"name": s.name, "cron": s.cron, "every_s": s.every_s, "tz": s.tz}
                            for s in t.schedules
                        ],
                    }
                    for t in found
                ],
                indent=2,
            )
        )
        return
    if not found:
        env.err.print("the app has no tasks", highlight=False)
        return
    table = Table(title=f"tasks ({len(found)})", title_justify="left")
    for name in ("name", "queue", "prio", "retries", "timeout", "rate", "limit", "schedule"):
        table.add_column(name, justify="right" if name in ("prio", "retries") else "left")
    for t in found:
        table.add_row(
            Text(t.name),
            Text(t.queue),
            str(t.priority),
            str(t.retries),
            "-" if t.timeout_s is None else f"{t.timeout_s:g} s",
            t.rate_limit or "-",
            "-" if t.concurrency is None else f"{t.concurrency} at once",
            Text(_schedule_text(t) or "-"),
        )
    env.out.print(table)


# --- purge --------------------------------------------------------------------------------------


@cli.command()
@click.argument("queue", required=False)
@click.option("--all", "all_queues", is_flag=True, help="Every queue.")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@target_options
@click.pass_obj
def purge(env: Env, queue: str | None, all_queues: bool, yes: bool) -> None:
    """Delete the scheduled and queued jobs of QUEUE, or of every queue with --all (running and
    finished jobs stay)."""
    if all_queues == (queue is not None):
        raise click.UsageError("give a QUEUE or --all (not both)")
    app = env.app()
    if not yes:
        waiting = {
            s.queue: s.counts.get("scheduled", 0) + s.counts.get("queued", 0) for s in app.stats()
        }
        if all_queues:
            n = sum(waiting.values())
            where = f"{len([q for q, c in waiting.items() if c])} queue(s)"
        else:
            assert queue is not None
            n, where = waiting.get(queue, 0), f"queue {queue!r}"
        click.confirm(f"Delete {n} waiting job(s) of {where}?", abort=True, err=True)
    if all_queues:
        purged = app.purge_all()
        for name, n in purged.items():
            click.echo(f"purged {n} job(s) from queue {name}")
        if not purged:
            click.echo("purged 0 job(s)")
        return
    assert queue is not None
    click.echo(f"purged {app.purge(queue)} job(s) from queue {queue}")
