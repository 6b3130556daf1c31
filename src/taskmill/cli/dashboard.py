"""taskmill dashboard: the web dashboard, the HTTP API and the probes, served by uvicorn."""

from __future__ import annotations

import signal
from collections.abc import Sequence
from types import FrameType
from typing import Any, cast

import click

from taskmill.cli._base import Env, app_option, cli, log_options
from taskmill.logs import LogFormat
from taskmill.logs import configure as configure_logging
from taskmill.urls import redact_url


def _user_pairs(
    ctx: click.Context, param: click.Parameter, values: Sequence[str]
) -> dict[str, str]:
    pairs = {}
    for n, value in enumerate(values, 1):
        name, sep, password = value.partition(":")
        if not sep or not name or not password:
            # the value holds a password: say which option, never echo it
            raise click.BadParameter(f"value {n} is not NAME:PASSWORD", ctx=ctx, param=param)
        pairs[name] = password
    return pairs


@cli.command()
@click.argument("app_arg", metavar="[APP]", required=False)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="The address to listen on; other than loopback, auth is required.")  # fmt: skip
@click.option("--port", type=click.IntRange(min=0, max=65535), default=8765, show_default=True)
@click.option(
    "--user", "users", metavar="NAME:PASSWORD", multiple=True, callback=_user_pairs,
    help="A user who may act (HTTP basic auth); repeat for more. Prefer "
    "TASKMILL_DASHBOARD_USERS: a command line is visible to other local users.",
)  # fmt: skip
@click.option(
    "--read-only-user", "read_only_users", metavar="NAME:PASSWORD", multiple=True,
    callback=_user_pairs, help="A user who may only look (env TASKMILL_DASHBOARD_READ_ONLY_USERS).",
)  # fmt: skip
@click.option("--token", "tokens", metavar="TOKEN", multiple=True,
              help="A bearer token for the API (env TASKMILL_DASHBOARD_TOKENS).")  # fmt: skip
@click.option(
    "--read-only-token", "read_only_tokens", metavar="TOKEN", multiple=True,
    help="A read-only bearer token (env TASKMILL_DASHBOARD_READ_ONLY_TOKENS).",
)  # fmt: skip
@log_options("Log lines (each action, with who did it) as text, or one JSON object a line.")
@app_option
@click.pass_obj
def dashboard(
    env: Env,
    app_arg: str | None,
    host: str,
    port: int,
    users: dict[str, str],
    read_only_users: dict[str, str],
    tokens: tuple[str, ...],
    read_only_tokens: tuple[str, ...],
    log_level: str,
    log_format: str,
) -> None:
    """Serve the web dashboard, the HTTP API (/api/v1) and the probes (/health, /ready) of
    APP with uvicorn. Auth: users and tokens from the options and the TASKMILL_DASHBOARD_*
    environment variables; with none, only this machine's loopback clients get in, and a
    --host other than loopback is refused."""
    try:
        import uvicorn

        from taskmill.web import WebConfig, create_app
        from taskmill.web.security import check_bind
    except ModuleNotFoundError as exc:
        raise click.UsageError(
            f"the dashboard needs the web extra ({exc.name} is missing): "
            "pip install 'taskmill[web]'"
        ) from None
    if app_arg:
        env.app_path = app_arg
    app = env.app(need_tasks=True)
    options: dict[str, Any] = {
        "users": users,
        "read_only_users": read_only_users,
        "tokens": tokens,
        "read_only_tokens": read_only_tokens,
    }
    config = WebConfig.from_env(**{k: v for k, v in options.items() if v})
    check_bind(host, config)
    configure_logging(log_level, cast("LogFormat", log_format))  # click.Choice checked it
    shown_host = f"[{host}]" if ":" in host else host
    env.err.print(
        f"taskmill dashboard on http://{shown_host}:{port}/ (broker {redact_url(app.url)}; "
        f"auth: {'configured' if config.has_auth else 'none, loopback clients only'})",
        markup=False,
        highlight=False,
    )
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(app, config),
            host=host,
            port=port,
            log_level=log_level.lower(),
            timeout_graceful_shutdown=5,
            server_header=False,
        )
    )

    def stop(signum: int, frame: FrameType | None) -> None:
        server.should_exit = True

    # uvicorn handles SIGTERM and Ctrl-C while it serves, then raises the signal again for
    # the handler it found: this one, so the app is closed and the exit code is 0 (as a
    # worker's); a signal before uvicorn listens stops it as soon as it starts
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    server.run()
