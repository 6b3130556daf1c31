"""Worker names: a human name given with ``--name`` (or ``name=``), kept in the worker's id.

A worker's id is ``host-pid-random``; with a name it is ``name@host-pid-random``. The name
lives in the id rather than in a field of its own so every broker stores and lists it as it
stores ids already, and two workers given the same name (the processes of one ``-p N``
command, or a restarted container) still have ids of their own.

>>> worker_id("render", host="web-1", pid=42, suffix="a1b2c3")
'render@web-1-42-a1b2c3'
>>> name_of("render@web-1-42-a1b2c3"), name_of("web-1-42-a1b2c3")
('render', None)
"""

from __future__ import annotations

import os
import re
import socket

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_name(name: str) -> str:
    """``name`` if it is a valid worker name, else ``ValueError`` saying what is allowed."""
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"invalid worker name {name!r}: use 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or a digit"
        )
    return name


def worker_id(
    name: str | None = None,
    *,
    host: str | None = None,
    pid: int | None = None,
    suffix: str | None = None,
) -> str:
    """A new worker id: unique per process and start, prefixed with ``name@`` if given."""
    base = "-".join(
        [
            host if host is not None else socket.gethostname(),
            str(pid if pid is not None else os.getpid()),
            suffix if suffix is not None else os.urandom(3).hex(),
        ]
    )
    return base if name is None else f"{check_name(name)}@{base}"


def name_of(worker_id: str) -> str | None:
    """The name a worker was given, read back from its id (``None``: no name)."""
    name, sep, _ = worker_id.partition("@")
    return name if sep else None


__all__ = ["check_name", "name_of", "worker_id"]
