"""Child processes of an example: an environment in which they can import ``examples`` (it is a
folder of the repository, not an installed package), and a stop that never hangs."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
"""The repository's root: the working directory and ``PYTHONPATH`` of the children."""


def child_env(
    settings: Mapping[str, str] | None = None, *, drop_prefixes: Iterable[str] = ("TASKMILL_",)
) -> dict[str, str]:
    """This process's environment for a child: without the variables named ``drop_prefixes*``
    (settings of a parent's own app must not leak into the child's), with ``settings``, the
    repository's root on ``PYTHONPATH``, and unbuffered output (its log is read while it runs).

    >>> env = child_env({"TASKMILL_URL": "memory://"})
    >>> env["TASKMILL_URL"], env["PYTHONUNBUFFERED"], str(ROOT) in env["PYTHONPATH"]
    ('memory://', '1', True)
    """
    prefixes = tuple(drop_prefixes)
    env = {k: v for k, v in os.environ.items() if not (prefixes and k.startswith(prefixes))}
    env.update(settings or {})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def stop(
    proc: subprocess.Popen[Any],
    *,
    sig: signal.Signals = signal.SIGTERM,
    timeout_s: float = 10.0,
    group: bool = False,
) -> int | None:
    """Send ``sig`` (to the process's whole session if ``group``: it was started with
    ``start_new_session``), wait up to ``timeout_s``, then SIGKILL. Its exit code, or ``None``
    if it had to be killed. A process that already exited is only reaped."""
    return stop_all([proc], sig=sig, timeout_s=timeout_s, group=group)[0]


def stop_all(
    procs: Sequence[subprocess.Popen[Any]],
    *,
    sig: signal.Signals = signal.SIGTERM,
    timeout_s: float = 10.0,
    group: bool = False,
) -> list[int | None]:
    """``stop`` for several at once: one signal each (a second SIGTERM would end a worker's
    drain), then one deadline for them all, so that their drains overlap."""
    for proc in procs:
        if proc.poll() is None:
            _signal(proc, sig, group=group)
    deadline = time.monotonic() + timeout_s
    codes: list[int | None] = []
    for proc in procs:
        try:
            codes.append(proc.wait(max(0.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            kill(proc, group=group)
            codes.append(None)
    return codes


def kill(proc: subprocess.Popen[Any], *, group: bool = False) -> None:
    """SIGKILL: no drain, no sign-off (the worker's jobs come back when their leases expire).
    A process that leads a process group of its own takes that group with it: what it
    started must not outlive it."""
    _signal(proc, signal.SIGKILL, group=group or _leads_group(proc))
    proc.wait(10)


def _leads_group(proc: subprocess.Popen[Any]) -> bool:
    try:
        return os.getpgid(proc.pid) == proc.pid
    except ProcessLookupError:
        return False


def _signal(proc: subprocess.Popen[Any], sig: signal.Signals, *, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError):
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)


def interrupt_on_sigterm() -> None:
    """Make SIGTERM raise ``KeyboardInterrupt``, as Ctrl-C does: a demo stopped by a process
    manager (or a test's timeout) unwinds and stops the servers and workers it started, which
    run in sessions of their own and would otherwise outlive it. Call it from the main thread."""
    signal.signal(signal.SIGTERM, _raise_interrupt)


def _raise_interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt
