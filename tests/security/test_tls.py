"""TLS and credentials against real servers with certificates made at test time: on each of
Redis (``rediss://``, ``ssl_ca_certs``), PostgreSQL (``sslmode=verify-full``/``require``,
``sslrootcert``) and NATS (``tls_ca``; users with passwords, a token), a job is sent and run
by a ``taskmill worker`` process over TLS; a URL trusting the wrong CA is refused at once with
a permanent error saying the certificate does not verify, by a producer and by a worker
(exit 3); wrong credentials likewise; the password is in none of it."""

from __future__ import annotations

import ssl
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from security.canary_app import build
from security.conftest import BROKER_PASSWORD, NATS_USER, Worker, broker_url
from security.tls import Pki, TlsNatsServer, TlsPostgresServer
from servers import NatsServer
from taskmill.brokers.nats.config import parse_url
from taskmill.brokers.nats.connection import tls_options
from taskmill.errors import BrokerError, ConfigurationError
from taskmill.testing import wait_until

pytestmark = pytest.mark.timeout(120)


def _run_one_job(url: str, worker: Callable[..., Worker]) -> tuple[float, Worker]:
    """A job sent over ``url`` and run by a worker process over it: seconds to its result."""
    w = worker(url, "-c", "2")
    app = build(url)
    try:
        started = time.monotonic()
        handle = app.get_task("sec.ok").send(7, "not-a-real-secret")
        assert handle.result(timeout=60) == {"n": 7, "length": 17}, w.output()
        return time.monotonic() - started, w
    finally:
        app.close()


def _refused(url: str, *words: str) -> tuple[float, str]:
    """A send over ``url`` fails at once with a permanent BrokerError saying ``words``."""
    app = build(url)
    started = time.monotonic()
    try:
        with pytest.raises(BrokerError) as caught:
            app.get_task("sec.ok").send(1, "x")
    finally:
        app.close()
    elapsed = time.monotonic() - started
    message = str(caught.value)
    assert caught.value.permanent, message
    assert all(w in message for w in words), message
    assert BROKER_PASSWORD not in message and BROKER_PASSWORD not in repr(caught.value)
    assert elapsed < 5, f"refused after {elapsed:.1f} s"
    return elapsed, message


def _worker_refused(url: str, worker: Callable[..., Worker], *words: str) -> str:
    """A worker process on ``url`` stops with exit code 3, naming the cause once."""
    w = worker(url, "-p", "1")
    wait_until(lambda: w.proc.poll() is not None, timeout=45, what="the worker to stop")
    out = w.output()
    assert w.proc.returncode == 3, out
    assert all(word in out for word in words), out
    assert BROKER_PASSWORD not in out
    return out


@pytest.mark.parametrize("kind", ["redis", "postgres", "nats"])
def test_a_job_runs_over_tls_and_a_wrong_ca_is_refused(
    kind: str, request: pytest.FixtureRequest, pki: Pki, worker: Callable[..., Worker]
) -> None:
    seconds, w = _run_one_job(broker_url(kind, request), worker)
    wrong = broker_url(kind, request, ca=pki.wrong_ca)
    words = {
        "redis": ("certificate verify failed",),
        "postgres": ("certificate verify failed",),
        "nats": ("certificate does not verify",),
    }[kind]
    refused_s, message = _refused(wrong, *words)
    _worker_refused(wrong, worker, *words)
    assert w.stop() == 0
    assert BROKER_PASSWORD not in w.output()
    print(f"TLS {kind}: job over TLS in {seconds:.2f} s; wrong CA refused in {refused_s:.2f} s "
          f"({message[:90]}...)")  # fmt: skip


def test_postgres_sessions_use_tls_and_sslmode_require_works(
    request: pytest.FixtureRequest, tls_postgres: TlsPostgresServer
) -> None:
    url = broker_url("postgres", request).replace("sslmode=verify-full", "sslmode=require")
    assert "sslrootcert" in url
    url = url.replace(f"sslrootcert={tls_postgres.pki.ca}", "sslrootcert=")  # no CA at all
    app = build(url)
    try:
        handle = app.get_task("sec.ok").send(3, "x")
        app.run_until_idle()
        assert handle.result(timeout=10) == {"n": 3, "length": 1}
        with tls_postgres.connect() as conn:
            rows = conn.execute(
                "SELECT s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) "
                "WHERE a.usename = %s AND a.application_name = 'taskmill'",
                (tls_postgres.role,),
            ).fetchall()
    finally:
        app.close()
    assert rows and all(ssl for (ssl,) in rows), rows
    print(f"TLS postgres: sslmode=require, {len(rows)} taskmill sessions, all TLS")


def test_nats_credentials_are_checked(
    request: pytest.FixtureRequest, tls_nats: TlsNatsServer
) -> None:
    good = broker_url("nats", request)
    _refused(good.replace(f":{BROKER_PASSWORD}@", ":not-the-password@"), "credentials")
    _refused(good.replace(f"{NATS_USER}:{BROKER_PASSWORD}@", ""), "credentials")


def test_nats_token_auth(tmp_path: Path) -> None:
    token = f"tok{uuid.uuid4().hex}"
    with TlsNatsServer(tmp_path / "nats-token", None, token=token) as server:
        app = build(f"{server.url_with(token)}?prefix=tok")
        try:
            handle = app.get_task("sec.ok").send(5, "x")
            app.run_until_idle()
            assert handle.result(timeout=10) == {"n": 5, "length": 1}
        finally:
            app.close()
        _refused(f"{server.url_with('not-the-token')}?prefix=tok", "credentials")


def test_nats_refuses_a_server_without_tls_when_the_url_asks_for_it(
    nats_server: NatsServer, pki: Pki
) -> None:
    url = f"{nats_server.url}?prefix=notls&tls_ca={pki.ca}"
    _refused(url, "does not require TLS")


def test_nats_tls_options_make_the_context(pki: Pki) -> None:
    """``tls_cert``/``tls_key`` load into the SSL context (not yet run against a server that
    verifies clients); a file that cannot be read is a ConfigurationError naming the cause."""
    config = parse_url(f"nats://127.0.0.1:4222?tls_ca={pki.ca}&tls_cert={pki.cert}"
                       f"&tls_key={pki.key}&tls_hostname=localhost")  # fmt: skip
    options = tls_options(config)
    assert isinstance(options["tls"], ssl.SSLContext) and options["tls_hostname"] == "localhost"
    assert options["tls"].verify_mode is ssl.CERT_REQUIRED
    assert tls_options(parse_url("nats://127.0.0.1:4222")) == {}
    with pytest.raises(ConfigurationError, match="TLS files"):
        tls_options(parse_url(f"nats://127.0.0.1:4222?tls_ca={pki.ca}.missing"))
    with pytest.raises(ConfigurationError, match="tls must be true or false"):
        parse_url("nats://127.0.0.1:4222?tls=maybe")


def test_nats_client_certificates(tmp_path: Path, pki: Pki) -> None:
    """A server that verifies clients (``verify: true``): a URL with ``tls_cert``/``tls_key``
    runs a job; one without a client certificate is refused at once, naming it."""
    with TlsNatsServer(tmp_path / "nats-mtls", pki, verify_clients=True) as server:
        base = server.url_with()  # ?tls_ca=...
        url = f"{base}&tls_cert={pki.client_cert}&tls_key={pki.client_key}&prefix=mtls"
        app = build(url)
        try:
            handle = app.get_task("sec.ok").send(4, "x")
            app.run_until_idle()
            assert handle.result(timeout=10) == {"n": 4, "length": 1}
        finally:
            app.close()
        refused = build(f"{base}&prefix=mtls&unavailable_after=2")
        started = time.monotonic()
        try:
            with pytest.raises(BrokerError) as caught:
                refused.get_task("sec.ok").send(1, "x")
        finally:
            refused.close()
        elapsed = time.monotonic() - started
        assert caught.value.permanent and "client certificate" in str(caught.value)
    print(f"TLS nats client certificates: job run; without one refused in {elapsed:.2f} s "
          f"({type(caught.value).__name__}, permanent={caught.value.permanent})")  # fmt: skip
