"""S10: a broker off this machine opened without TLS or credentials is named in a WARNING
(``taskmill.security``), its password masked; one on loopback is not. taskmill warns rather
than refuses (docs/brokers.md, "A broker off this machine without TLS or credentials"). The
tests never connect off this machine: which URLs are exposed is a pure function, and the
warning's wiring is shown by opening a loopback broker with that function's answer forced."""

from __future__ import annotations

import logging

import pytest

import taskmill.client
from servers import RedisServer
from taskmill import App
from taskmill.urls import exposure

CASES = {
    # on this machine: never
    "redis://127.0.0.1:6379/0": None,
    "redis://localhost/0": None,
    "redis://[::1]:6379/0": None,
    "postgresql://app@/app?host=/var/run/postgresql": None,
    "nats://127.0.0.1:4222": None,
    "sqlite:///jobs.db": None,
    "memory://": None,
    # off it
    "redis://10.0.0.5:6379/0": "TLS and credentials",
    "redis://:pw@10.0.0.5:6379/0": "TLS",
    "rediss://10.0.0.5:6380/0": "credentials",
    "rediss://:pw@cache.internal:6380/0?ssl_ca_certs=/ca.pem": None,
    "valkeys://app:pw@cache.internal:6380/0": None,
    "postgresql://app:pw@db.internal/app": "TLS",
    "postgresql://app@db.internal/app?sslmode=prefer": "TLS",
    "postgresql://app@db.internal/app?sslmode=require": None,
    "postgresql://app@[2001:db8::1]:5432/app?sslmode=verify-full": None,
    "postgresql://app@/app?host=db.internal&sslmode=disable": "TLS",
    "nats://nats.internal:4222": "TLS and credentials",
    "nats://127.0.0.1:4222,10.0.0.7:4222": "TLS and credentials",
    "nats://app:pw@nats.internal:4222": "TLS",
    "nats://TOKEN@nats.internal:4222?tls=true": None,
    "nats://app:pw@nats.internal:4222?tls_ca=/ca.pem": None,
    "nats://app:pw@nats.internal:4222?tls=false": "TLS",
}


@pytest.mark.parametrize(("url", "missing"), CASES.items())
def test_s10_what_an_exposed_url_lacks(url: str, missing: str | None) -> None:
    assert exposure(url) == missing


def test_s10_opening_an_exposed_broker_warns_once_without_the_password(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.DEBUG)
    url = redis_server.url.replace("redis://", "redis://:s3cr3t-pw@") + "?prefix=s10:"
    app = App(url)
    try:
        app.open()  # loopback: nothing to say
        assert not [r for r in caplog.records if r.name == "taskmill.security"]
    finally:
        app.close()
    monkeypatch.setattr(taskmill.client, "exposure", lambda url: "TLS")
    app = App(url)
    try:
        app.open()
        app.open()
    finally:
        app.close()
    warnings = [r for r in caplog.records if r.name == "taskmill.security"]
    assert [r.levelno for r in warnings] == [logging.WARNING]
    message = warnings[0].getMessage()
    assert "redis://:***@127.0.0.1" in message and "has no TLS" in message
    assert "s3cr3t-pw" not in message
    print(f"S10: {len(CASES)} URLs classified; the warning: {message[:100]}...")
