"""What every command shares: finding the app, the broker call, formatting, the group."""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich.console import Console
from rich.text import Text

from taskmill.app import DEFAULT_URL, App
from taskmill.brokers.base import Broker
from taskmill.errors import ConfigurationError
from taskmill.job import Job, JobState, MetaValue
from taskmill.meta import parse_pair
from taskmill.urls import redact_url

if TYPE_CHECKING:
    pass


T = TypeVar("T")

log = logging.getLogger("taskmill.cli")


_STATES = [s.value for s in JobState]


class CliError(click.ClickException):
    """A user error that is not about the command line's shape: exit code 1."""

    exit_code = 1


# --- where the app comes from -------------------------------------------------------------------


@dataclass
class Env:
    """What the group and its subcommands agree on: the target, consoles, the app to close."""

    app_path: str | None = None
    url: str | None = None
    url_from_flag: bool = False
    out: Console = field(default_factory=lambda: _console(stderr=False))
    err: Console = field(default_factory=lambda: _console(stderr=True))
    _app: App | None = None
    _loaded: bool = False

    def app(self, *, need_tasks: bool = False) -> App:
        """The app: loaded from the app path, else a task-less ``App(url)``."""
        if self._app is not None and (self._loaded or not need_tasks):
            return self._app
        path = self.app_path or os.environ.get("TASKMILL_APP") or None
        if path:
            app = load(path)
            if self.url_from_flag and self.url and self.url != app.url:
                self.err.print(
                    f"warning: --url is ignored: the app {path} uses {redact_url(app.url)}",
                    markup=False,
                    highlight=False,
                )
            self._app, self._loaded = app, True
            return app
        if need_tasks:
            raise click.UsageError(
                "no app given: pass APP or --app module:app, or set TASKMILL_APP"
            )
        url = self.url or os.environ.get("TASKMILL_URL") or None
        if url is None:
            if not os.path.exists(DEFAULT_URL.removeprefix("sqlite:///")):
                raise click.UsageError(
                    "no app or broker given: pass --app module:app or --url URL, or set "
                    "TASKMILL_APP or TASKMILL_URL"
                )
            url = DEFAULT_URL
        self._app = App(url)
        return self._app

    def close(self) -> None:
        if self._app is not None:
            self._app.close()


def load(path: str) -> App:
    """``load_app`` with the failures of the user's module reported as one usage line."""
    from taskmill.loader import load_app

    try:
        app = load_app(path)
    except ConfigurationError as exc:
        raise click.UsageError(str(exc)) from None
    except Exception as exc:
        # the user's module raised while importing: say where, in one line
        frames = traceback.extract_tb(exc.__traceback__)
        where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
        raise click.UsageError(
            f"cannot load app {path!r}: {type(exc).__name__}: {exc}{where}"
        ) from None
    if not isinstance(app, App):
        raise click.UsageError(f"{path!r} is a {type(app).__name__}, not a taskmill App")
    return app


def _console(*, stderr: bool) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    # piped output keeps full rows (ids are 36 characters) instead of wrapping at 80 columns
    width = None if stream.isatty() else 200
    return Console(stderr=stderr, width=width, soft_wrap=False)


def _remember_app(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value:
        ctx.ensure_object(Env).app_path = value


def _remember_url(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value:
        env = ctx.ensure_object(Env)
        env.url, env.url_from_flag = value, True


def app_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--app``, accepted after a command as well as before it."""
    return click.option(
        "--app",
        "app_path",
        metavar="MODULE:ATTR",
        expose_value=False,
        callback=_remember_app,
        help="The app (env TASKMILL_APP).",
    )(fn)


def target_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--app`` and ``--url``, accepted after a command as well as before it."""
    fn = click.option(
        "--url",
        metavar="URL",
        expose_value=False,
        callback=_remember_url,
        help="Broker URL (env TASKMILL_URL), used when no app is given.",
    )(fn)
    return app_option(fn)


def log_options(format_help: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--log-level`` and ``--log-format`` of a long-running command (worker, scheduler,
    dashboard); ``format_help`` says what its lines hold."""

    def add(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn = click.option(
            "--log-format",
            type=click.Choice(["text", "json"]),
            default="text",
            show_default=True,
            help=format_help,
        )(fn)
        return click.option(
            "--log-level",
            type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
            default="info",
            show_default=True,
        )(fn)

    return add


def broker_call(app: App, fn: Callable[[Broker], Awaitable[T]]) -> T:
    """Run ``fn(broker)`` on the app's private loop and wait for it."""

    async def go() -> T:
        return await fn(await app.abroker())

    return app.run_sync(go())


# --- formatting ---------------------------------------------------------------------------------


def age(seconds: float | None) -> str:
    """A short human duration: ``850ms``, ``12.3s``, ``4m05s``, ``2h10m``, ``3d04h``."""
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def when(ts: float | None, now: float) -> str:
    """A timestamp as local time plus how long ago (or until) it is."""
    if ts is None:
        return "-"
    stamp = datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")
    delta = now - ts
    return f"{stamp} ({age(delta)} ago)" if delta >= 0 else f"{stamp} (in {age(-delta)})"


def progress_text(job: Job) -> str:
    parts = []
    if job.progress is not None:
        parts.append(f"{job.progress * 100:.0f}%")
    if job.progress_message:
        parts.append(job.progress_message)
    return " ".join(parts) or "-"


_STATE_STYLE = {
    "scheduled": "cyan",
    "queued": "blue",
    "running": "yellow",
    "succeeded": "green",
    "failed": "red",
    "cancelled": "magenta",
}


def state_text(state: str) -> Text:
    return Text(state, style=_STATE_STYLE.get(state, ""))


def dumps(value: Any, *, indent: int | None = None) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=False, default=str)


# --- the group ----------------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--app",
    "app_path",
    metavar="MODULE:ATTR",
    envvar="TASKMILL_APP",
    help="The app (env TASKMILL_APP).",
)
@click.option("--url", metavar="URL", help="Broker URL (env TASKMILL_URL).")
@click.version_option(package_name="taskmill", prog_name="taskmill")
@click.pass_context
def cli(ctx: click.Context, app_path: str | None, url: str | None) -> None:
    """taskmill: background jobs for Python.

    \b
      taskmill worker myapp:app -q urgent,default -c 16 -p 2
      taskmill enqueue myapp.resize '[42, 20]' --app myapp:app --wait
      taskmill jobs list --state failed ; taskmill jobs retry --all-failed
      taskmill queues ; taskmill workers
    """
    env = ctx.ensure_object(Env)
    env.app_path = app_path
    if url:
        env.url, env.url_from_flag = url, True
    ctx.call_on_close(env.close)


def meta_pairs(
    ctx: click.Context, param: click.Parameter, values: Sequence[str]
) -> dict[str, MetaValue]:
    """``--meta KEY=VALUE`` options (repeatable) as a metadata mapping; VALUE is JSON when it
    reads as a number, ``true``, ``false``, ``null`` or a quoted string, else text."""
    pairs: dict[str, MetaValue] = {}
    for text in values:
        try:
            key, value = parse_pair(text)
        except ConfigurationError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
        pairs[key] = value
    return pairs
