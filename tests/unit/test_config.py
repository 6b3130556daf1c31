"""Settings, broker URLs and the choice of broker: validated, with clear errors, no I/O."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest

from taskmill import App, ConfigurationError, Settings
from taskmill.brokers import broker_from_url
from taskmill.brokers.memory import MemoryBroker
from taskmill.brokers.postgres import PostgresBroker, migrations
from taskmill.brokers.postgres import parse_url as parse_postgres_url
from taskmill.brokers.sqlite import SQLiteBroker, parse_url

# --- Settings --------------------------------------------------------------------------------


def test_unknown_options_are_an_error_that_lists_the_known_ones() -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.build({"lease": 5, "retries": 2, "lease_s": 10})
    message = str(info.value)
    assert message.startswith("unknown App option(s) ['lease', 'retries']; known options: ")
    for known in ("lease_s", "heartbeat_s", "max_payload_bytes", "result_ttl_s", "default_queue"):
        assert known in message


def test_app_passes_its_keyword_arguments_to_settings() -> None:
    with pytest.raises(ConfigurationError, match=r"unknown App option\(s\) \['leese_s'\]"):
        App("memory://", leese_s=5)
    app = App("memory://", lease_s=12, default_queue="jobs")
    assert app.settings.lease_s == 12
    assert app.settings.default_queue == "jobs"


def test_defaults() -> None:
    s = Settings.build({})
    assert s.lease_s == 30.0
    assert s.max_lost_leases == 3
    assert s.result_ttl_s == 7 * 24 * 3600
    assert s.max_payload_bytes == 1 << 20
    assert s.default_queue == "default"
    assert s.effective_heartbeat_s == 2.0
    assert s.effective_recover_interval_s == 5.0


def test_derived_intervals_follow_the_lease() -> None:
    short = Settings.build({"lease_s": 3})
    assert short.effective_heartbeat_s == 1.0
    assert short.effective_recover_interval_s == 1.5
    explicit = Settings.build({"lease_s": 3, "heartbeat_s": 0.5, "recover_interval_s": 0.25})
    assert explicit.effective_heartbeat_s == 0.5
    assert explicit.effective_recover_interval_s == 0.25


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lease_s": 0}, "lease_s must be > 0"),
        ({"lease_s": -1}, "lease_s must be > 0"),
        ({"heartbeat_s": 0}, "heartbeat_s must be > 0 and shorter than lease_s"),
        ({"lease_s": 5, "heartbeat_s": 5}, "heartbeat_s must be > 0 and shorter than lease_s"),
        ({"max_lost_leases": 0}, "max_lost_leases must be >= 1"),
        ({"max_payload_bytes": 10}, "max_payload_bytes must be >= 64"),
        ({"result_ttl_s": -1}, "result_ttl_s must be >= 0 and prune_interval_s > 0"),
        ({"prune_interval_s": 0}, "result_ttl_s must be >= 0 and prune_interval_s > 0"),
    ],
)
def test_invalid_values_are_rejected(options: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigurationError, match=f"^{message}"):
        Settings.build(options)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lease_s": "30"}, "lease_s must be a number, not '30'"),
        ({"max_lost_leases": None}, "max_lost_leases must be a number, not None"),
        ({"heartbeat_s": "1"}, "heartbeat_s must be a number, not '1'"),
        ({"default_queue": 3}, "default_queue must be a string, not 3"),
    ],
)
def test_values_of_the_wrong_type_are_rejected_by_name(
    options: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=f"^{message}$"):
        Settings.build(options)


# --- URLs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "path", "options"),
    [
        ("sqlite:///taskmill.db", "taskmill.db", {}),
        ("sqlite:///data/jobs.db", "data/jobs.db", {}),
        ("sqlite:////var/lib/app/jobs.db", "/var/lib/app/jobs.db", {}),
        (
            "sqlite:///jobs.db?busy_timeout_ms=200&synchronous=full",
            "jobs.db",
            {"busy_timeout_ms": "200", "synchronous": "full"},
        ),
    ],
)
def test_parse_sqlite_url(url: str, path: str, options: dict[str, str]) -> None:
    assert parse_url(url) == (path, options)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("memory://", "not a sqlite URL: 'memory://'"),
        ("sqlite://localhost/jobs.db", "sqlite URL 'sqlite://localhost/jobs.db' has a host"),
        ("sqlite://", "sqlite URL 'sqlite://' names no file"),
        ("sqlite:///", "sqlite URL 'sqlite:///' names no file"),
        ("sqlite:///:memory:", "sqlite URL 'sqlite:///:memory:' names no file"),
        # one slash (or none) silently meant ./x.db: both readings are offered instead
        (
            "sqlite:/x.db",
            "sqlite URL 'sqlite:/x.db' needs // after 'sqlite:': write sqlite:///x.db for x.db "
            "in the working directory, or sqlite:////x.db for the absolute path /x.db",
        ),
        (
            "sqlite:jobs/x.db",
            "sqlite URL 'sqlite:jobs/x.db' needs // after 'sqlite:': write "
            "sqlite:///jobs/x.db for jobs/x.db in the working directory, or sqlite:////jobs/x.db",
        ),
    ],
)
def test_bad_sqlite_urls(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_url(url)
    assert str(info.value).startswith(message)


def test_a_url_without_a_file_suggests_the_memory_broker() -> None:
    with pytest.raises(ConfigurationError, match=r"use memory:// for tests"):
        parse_url("sqlite:///:memory:")


def test_unknown_sqlite_url_options_are_an_error_that_lists_the_known_ones() -> None:
    with pytest.raises(ConfigurationError) as info:
        SQLiteBroker("sqlite:///jobs.db?timeout=5&mode=ro")
    assert str(info.value) == (
        "unknown sqlite URL option(s) ['mode', 'timeout']; "
        "known: busy_timeout_ms, synchronous, poll_ms"
    )


def test_sqlite_synchronous_option_is_validated() -> None:
    with pytest.raises(ConfigurationError, match=r"synchronous must be off/normal/full/extra"):
        SQLiteBroker("sqlite:///jobs.db?synchronous=sometimes")
    assert SQLiteBroker("sqlite:///jobs.db?synchronous=off").synchronous == "OFF"


def test_sqlite_numeric_options_are_validated() -> None:
    with pytest.raises(ConfigurationError, match=r"busy_timeout_ms"):
        SQLiteBroker("sqlite:///jobs.db?busy_timeout_ms=soon")


def test_sqlite_url_options_are_applied() -> None:
    broker = SQLiteBroker("sqlite:///jobs.db?busy_timeout_ms=250&poll_ms=50")
    assert broker.busy_timeout_ms == 250
    assert broker.poll_s == 0.05


def test_broker_from_url_picks_the_broker_by_scheme_without_connecting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert isinstance(broker_from_url("memory://"), MemoryBroker)
    assert isinstance(broker_from_url("memory://?eager=1"), MemoryBroker)
    sqlite = broker_from_url("sqlite:///jobs.db")
    assert isinstance(sqlite, SQLiteBroker)
    assert isinstance(broker_from_url("SQLite:///jobs.db"), SQLiteBroker)
    assert sqlite.path == "jobs.db"
    assert list(tmp_path.iterdir()) == []  # made, not opened: no file yet


@pytest.mark.parametrize("url", ["amqp://localhost:5672/", "mysql://db/jobs", "jobs.db", "", "://"])
def test_unknown_scheme_is_an_error_naming_the_supported_ones(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        broker_from_url(url)
    message = str(info.value)
    assert message.startswith(f"no broker for URL {url!r}; supported schemes: ")
    assert "memory://" in message and "sqlite:///path" in message


def test_an_app_with_an_unknown_scheme_fails_on_first_use_not_at_construction() -> None:
    app = App("amqp://localhost:5672/")  # declaring an app does no I/O and no validation
    with pytest.raises(ConfigurationError, match=r"no broker for URL 'amqp://localhost"):
        app.broker  # noqa: B018


def test_parse_postgres_url_separates_taskmills_options_from_libpqs() -> None:
    config = parse_postgres_url(
        "postgres://app:s%40cret@db.internal:6432/jobs?schema=queue_1&migrate=false"
        "&unavailable_after_s=2.5&pool_size=4&sslmode=require&options=-c%20statement_timeout%3D5s"
    )
    assert (config.schema, config.migrate, config.unavailable_after_s, config.pool_size) == (
        "queue_1",
        False,
        2.5,
        4,
    )
    assert config.where == "db.internal:6432/jobs"  # never the password
    parts = urlsplit(config.conninfo)
    assert parts.scheme == "postgresql" and parts.netloc == "app:s%40cret@db.internal:6432"
    assert dict(parse_qsl(parts.query)) == {
        "sslmode": "require",
        "options": "-c statement_timeout=5s",
        "application_name": "taskmill",
        "connect_timeout": "3",
    }
    assert "%20" in parts.query and "+" not in parts.query  # libpq does not decode "+"
    defaults = parse_postgres_url("postgresql:///jobs")
    assert (defaults.schema, defaults.migrate, defaults.unavailable_after_s) == (
        "taskmill",
        True,
        5.0,
    )


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql://db/x?schema=Jobs", "schema in .* must be a lowercase identifier"),
        ("postgresql://db/x?schema=a;drop", "must be a lowercase identifier"),
        ("postgresql://db/x?schema=" + "s" * 49, "at most 48 characters"),
        ("postgresql://db/x?migrate=maybe", "migrate in .* must be true or false"),
        ("postgresql://db/x?unavailable_after_s=soon", "must be numbers"),
        ("postgresql://db/x?unavailable_after_s=0", "unavailable_after_s > 0"),
        ("postgresql://db/x?pool_size=1", "pool_size >= 2"),
        ("mysql://db/x", "not a PostgreSQL URL"),
    ],
)
def test_bad_postgres_urls(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        parse_postgres_url(url)


def test_broker_from_url_makes_a_postgres_broker_without_connecting() -> None:
    for url in ("postgresql://nowhere.invalid/x", "postgres://nowhere.invalid/x?schema=s"):
        broker = broker_from_url(url)
        assert isinstance(broker, PostgresBroker)
        assert broker.capabilities.server_clock and broker.capabilities.transactional_enqueue
    assert PostgresBroker("postgres://h/x?schema=s").channel == "s_wake"


def test_postgres_migrations_are_numbered_from_one_without_gaps() -> None:
    found = migrations()
    assert [m.version for m in found] == list(range(1, len(found) + 1))
    assert found[0].name == "0001_initial" and "{schema}.jobs" in found[0].sql


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://h:6379/abc", "must be a database number, as in redis://host:6379/0, not 'abc'"),
        ("redis://h:6379/0?prefix=", "empty prefix"),
    ],
)
def test_redis_urls_that_would_silently_mean_something_else_are_refused(
    url: str, message: str
) -> None:
    from taskmill.brokers.redis import parse_url as parse_redis_url

    with pytest.raises(ConfigurationError, match=re.escape(message)):
        parse_redis_url(url)
    assert parse_redis_url("redis://h:6379/2?prefix=a:")[1] == "a:"
