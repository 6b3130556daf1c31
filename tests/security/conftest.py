"""The security tests' servers: one CA per module run, and each server broker with TLS (a
certificate made at test time) and a password (``BROKER_PASSWORD``, a fresh canary per
session). ``worker`` starts ``taskmill worker`` processes of ``security.canary_app``."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from security.tls import Pki, TlsNatsServer, TlsPostgresServer, TlsRedisServer, make_pki

TESTS = Path(__file__).resolve().parents[1]
BROKER_PASSWORD = f"brokerpw{uuid.uuid4().hex[:16]}"
"""The servers' password: a canary that must appear nowhere taskmill writes or shows."""
NATS_USER = "app"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[TlsRedisServer]:
    server = TlsRedisServer(tmp_path_factory.mktemp("redis-tls"), pki, BROKER_PASSWORD)
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def tls_postgres(pki: Pki) -> Iterator[TlsPostgresServer]:
    server = TlsPostgresServer(pki, BROKER_PASSWORD)
    try:
        server.start()
        server.add_password_role(server.role, BROKER_PASSWORD)
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="module")
def tls_nats(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[TlsNatsServer]:
    server = TlsNatsServer(
        tmp_path_factory.mktemp("nats-tls"), pki, users={NATS_USER: BROKER_PASSWORD}
    )
    server.start()
    yield server
    server.kill()


def broker_url(kind: str, request: pytest.FixtureRequest, ca: Path | None = None) -> str:
    """A URL on the TLS server of ``kind`` (redis, postgres, nats), with the password, under
    a prefix or schema of its own; ``ca``: trust that CA instead of the server's."""
    tag = uuid.uuid4().hex[:10]
    if kind == "redis":
        redis_server: TlsRedisServer = request.getfixturevalue("tls_redis")
        return f"{redis_server.url_with(ca)}&prefix=s{tag}:"
    if kind == "postgres":
        pg: TlsPostgresServer = request.getfixturevalue("tls_postgres")
        return f"{pg.url_with(ca)}&schema=s{tag}"
    nats: TlsNatsServer = request.getfixturevalue("tls_nats")
    return f"{nats.url_with(f'{NATS_USER}:{BROKER_PASSWORD}', ca=ca)}&prefix=s{tag}"


class Worker:
    """One ``taskmill worker`` process of ``security.canary_app``, logging to a file."""

    def __init__(self, tmp_path: Path, url: str, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TASKMILL_")}
        env["TASKMILL_URL"] = url
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        self.log_path = tmp_path / f"worker-{uuid.uuid4().hex[:6]}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "taskmill", "worker", "--app", "security.canary_app:app",
             *args],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, cwd=tmp_path, start_new_session=True,
        )  # fmt: skip

    def output(self) -> str:
        return self.log_path.read_text("utf-8", "replace")

    def stop(self) -> int:
        """SIGTERM (a drain), then SIGKILL after 20 s; the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    started: list[Worker] = []

    def start(url: str, *args: str) -> Worker:
        w = Worker(tmp_path, url, *args)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()
