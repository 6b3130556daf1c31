"""taskmill schedules (what is scheduled, when it runs next, how it last went) and taskmill
scheduler (the scheduler alone, for deployments whose workers run --no-scheduler)."""

from __future__ import annotations

import asyncio
import logging
import signal
from datetime import datetime
from typing import Any, cast

import click
from rich.table import Table
from rich.text import Text

from taskmill.cli._base import Env, app_option, cli, dumps, log_options, state_text
from taskmill.logs import LogFormat
from taskmill.logs import configure as configure_logging
from taskmill.scheduler import Scheduler, ScheduleStatus, schedule_statuses
from taskmill.urls import redact_url


def _every(status: ScheduleStatus) -> str:
    s = status.schedule
    if s.cron is not None:
        return f"cron {s.cron}" + (f" ({s.tz})" if s.tz != "UTC" else "")
    assert s.every is not None
    return f"every {s.every}"


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


@cli.group(invoke_without_command=True)
@click.option("-n", "--next", "n_next", type=click.IntRange(min=1), default=3, show_default=True,
              help="How many next run times to show.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@app_option
@click.pass_context
def schedules(ctx: click.Context, n_next: int, as_json: bool) -> None:
    """List the app's periodic schedules: when each runs next (UTC), its last tick and the
    state of that tick's job. `taskmill schedules trigger NAME` sends one's job now."""
    if ctx.invoked_subcommand is not None:
        return
    env: Env = ctx.obj
    app = env.app(need_tasks=True)
    statuses = app.run_sync(schedule_statuses(app, n_next))
    rows: list[dict[str, Any]] = [
        {
            "name": st.schedule.name,
            "task": st.schedule.task,
            "when": _every(st),
            "misfire": st.schedule.misfire,
            "overlap": st.schedule.overlap,
            "next": [_iso(t) for t in st.next_ticks],
            "last_tick": _iso(st.last_tick),
            "last_state": st.last_state.value if st.last_state is not None else None,
        }
        for st in statuses
    ]
    if as_json:
        click.echo(dumps(rows, indent=2))
        return
    if not rows:
        env.err.print("the app has no periodic schedules", highlight=False)
        return
    table = Table(title="schedules", title_justify="left")
    for name in ("name", "task", "when", "next runs (UTC)", "last tick", "last outcome"):
        table.add_column(name)
    for row in rows:
        table.add_row(
            Text(row["name"]),
            Text(row["task"]),
            Text(row["when"]),
            "\n".join(t[:19].replace("T", " ") for t in row["next"]),
            (row["last_tick"] or "-")[:19].replace("T", " "),
            state_text(row["last_state"]) if row["last_state"] else Text("-"),
        )
    env.out.print(table)


@schedules.command()
@click.argument("name")
@app_option
@click.pass_obj
def trigger(env: Env, name: str) -> None:
    """Send the schedule NAME's job now, outside its timetable (its ticks do not move). With
    overlap="skip", a run still pending is shown instead of a new one. Prints the job's id."""
    app = env.app(need_tasks=True)
    handle = app.trigger_schedule(name)
    if handle.existing:
        env.err.print(f"a run of {name!r} is still pending: {handle.id}", highlight=False)
    click.echo(handle.id)


@cli.command()
@log_options("Log lines as text, or one JSON object a line.")
@app_option
@click.pass_obj
def scheduler(env: Env, log_level: str, log_format: str) -> None:
    """Enqueue the app's periodic schedules' ticks, and run no jobs. Any number may run
    beside workers (each tick is enqueued once); SIGTERM or Ctrl-C stops it."""
    app = env.app(need_tasks=True)
    configure_logging(log_level, cast("LogFormat", log_format))  # click.Choice checked it
    if not app.schedules:
        raise click.UsageError("the app has no periodic schedules (see @app.periodic)")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        logging.getLogger("taskmill.scheduler").info(
            "scheduler started: %d schedules, broker=%s", len(app.schedules), redact_url(app.url)
        )
        try:
            await Scheduler(app).run(stop)
        finally:
            await app.aclose()

    asyncio.run(main())
