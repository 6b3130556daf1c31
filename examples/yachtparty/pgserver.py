"""A throwaway PostgreSQL for the demo, when no ``DATABASE_URL`` is given: ``initdb`` in a
temporary directory, ``postgres`` on a free loopback port, everything deleted at the end.

Debian keeps ``initdb`` and ``postgres`` off the PATH (``/usr/lib/postgresql/N/bin``), so they
are looked for there too. PostgreSQL refuses to run as root: as root, both run as the
``postgres`` system user, which owns the directory.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg


class PostgresMissingError(RuntimeError):
    """No PostgreSQL server binaries on this machine."""


def find_bindir() -> Path:
    """Where ``initdb`` and ``postgres`` are: beside ``pg_config``'s, on the PATH, or in
    Debian's newest ``/usr/lib/postgresql/*/bin``."""
    candidates = []
    if pg_config := shutil.which("pg_config"):
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        candidates.append(Path(out.stdout.strip()))
    if initdb := shutil.which("initdb"):
        candidates.append(Path(initdb).parent)
    debian = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += sorted((Path(p) for p in debian), key=lambda p: _version(p), reverse=True)
    for directory in candidates:
        if (directory / "initdb").is_file() and (directory / "postgres").is_file():
            return directory
    raise PostgresMissingError(
        "no PostgreSQL server found (initdb and postgres): install it (Debian: apt-get install "
        "postgresql), or point DATABASE_URL at a server: postgresql://user@host:5432/db"
    )


def _version(bindir: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in bindir.parent.name.split(".") if part.isdigit())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ThrowawayPostgres:
    """``with ThrowawayPostgres() as url:`` a PostgreSQL URL, gone after the block."""

    def __init__(self) -> None:
        self.bindir = find_bindir()
        self.as_user: dict[str, Any] = {}
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresMissingError(
                    "running as root, and PostgreSQL will not: there is no 'postgres' user to "
                    "run it as; set DATABASE_URL instead"
                ) from None
            self.as_user = {"user": "postgres", "group": "postgres", "extra_groups": []}
        self.directory = Path(tempfile.mkdtemp(prefix="yachtparty-pg-"))
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def __enter__(self) -> str:
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self.url

    def _start(self) -> None:
        data = self.directory / "data"
        if self.as_user:
            shutil.chown(self.directory, "postgres", "postgres")
        subprocess.run(
            [self.bindir / "initdb", "-D", data, "-U", "postgres", "--auth=trust",
             "--encoding=UTF8", "--locale=C", "--no-sync"],
            check=True, capture_output=True, cwd=self.directory, **self.as_user,
        )  # fmt: skip
        log = open(self.directory / "postgres.log", "wb")  # noqa: SIM115 - the server's
        self.proc = subprocess.Popen(
            [self.bindir / "postgres", "-D", data, "-p", str(self.port),
             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={data}"],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.directory, **self.as_user,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(self.url, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    text = (self.directory / "postgres.log").read_text(errors="replace")
                    raise RuntimeError(f"PostgreSQL did not start:\n{text}") from None
                time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # a fast shutdown: clients are disconnected
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.directory, ignore_errors=True)
