"""The ``taskmill`` command line.

Every command finds its target from ``--app module:attr`` (or ``TASKMILL_APP``); the commands
that only read or manage stored jobs also work with just ``--url`` (or ``TASKMILL_URL``). With
an app, the app's URL is used and ``--url`` is ignored. ``--app`` and ``--url`` may be given
before the command (``taskmill --app myapp:app queues``) or after it.

Errors print one line, ``error: ...``, on stderr: exit code 2 for a command line that cannot be
used as written (bad option, unreadable ARGS_JSON, no app), 1 for everything else (unknown task
or job, arguments that do not fit the task, a broker error, a failed job under ``--wait``).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

import click

# the command modules register themselves on the group when imported
from taskmill.cli import admin, dashboard, enqueue, jobs, migrate, schedules, worker  # noqa: F401
from taskmill.cli._base import cli
from taskmill.errors import TaskmillError

__all__ = ["cli", "main", "run"]


# --- entry point --------------------------------------------------------------------------------


def _one_line(message: str) -> str:
    return " ".join(message.split())


def run(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code (errors reported as one line on stderr)."""
    try:
        rv = cli.main(args=argv, prog_name="taskmill", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        exc.show()
        return exc.exit_code
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        click.echo(f"error: {_one_line(exc.format_message())}{hint}", err=True)
        return exc.exit_code
    except click.ClickException as exc:
        click.echo(f"error: {_one_line(exc.format_message())}", err=True)
        return exc.exit_code
    except click.Abort as exc:
        interrupted = isinstance(exc.__cause__ or exc.__context__, KeyboardInterrupt)
        click.echo("error: interrupted" if interrupted else "error: aborted", err=True)
        return 130 if interrupted else 1
    except TaskmillError as exc:
        click.echo(f"error: {_one_line(str(exc))}", err=True)
        return 1
    except BrokenPipeError:
        # the reader went away (`taskmill jobs list | head`): not an error worth a traceback
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return rv if isinstance(rv, int) else 0


def main() -> NoReturn:
    """The ``taskmill`` console script."""
    sys.exit(run())
