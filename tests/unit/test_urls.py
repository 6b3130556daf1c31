"""Broker URLs are shown without their passwords: ``redact_url`` and where it is used."""

from __future__ import annotations

import pytest

from taskmill import App, ConfigurationError
from taskmill.brokers import broker_from_url
from taskmill.loader import load_app
from taskmill.urls import redact_url, scrub

CANARY = "S3CRETpw"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://default:S3CRETpw@host:6390/0", "redis://default:***@host:6390/0"),
        ("rediss://:S3CRETpw@host/0?prefix=a:", "rediss://:***@host/0?prefix=a:"),
        ("valkey://u:S3C%40RETpw@host", "valkey://u:***@host"),
        ("postgresql://app:S3CRETpw@db:5432/jobs", "postgresql://app:***@db:5432/jobs"),
        (
            "postgres://app@db/jobs?sslmode=require&password=S3CRETpw&schema=q",
            "postgres://app@db/jobs?sslmode=require&***&schema=q".replace("&***", "&password=***"),
        ),
        ("postgresql://app:p@ss@db/jobs", "postgresql://app:***@db/jobs"),  # "@" unescaped
        ("redis://u:pa/ss@host/0", "redis://u:***@host/0"),  # "/" unescaped
        ("postgresql://app:S3CRETpw@[::1]:5432/jobs", "postgresql://app:***@[::1]:5432/jobs"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("redis://user@host:6379/0", "redis://user@host:6379/0"),
        ("sqlite:////var/lib/jobs.db", "sqlite:////var/lib/jobs.db"),
        ("memory://", "memory://"),
    ],
)
def test_redact_url_masks_the_password_and_keeps_the_rest(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_scrub_masks_a_urls_secrets_in_other_text_as_written_and_decoded() -> None:
    url = "postgresql://app:S3CRET%21pw@db/jobs"
    assert scrub("auth with S3CRET!pw / S3CRET%21pw failed", url) == "auth with *** / *** failed"


@pytest.mark.parametrize(
    "url",
    [
        f"redis://default:{CANARY}@127.0.0.1:6390/0?unavailable_after_s=soon",
        f"postgresql://app:{CANARY}@db/jobs?schema=Bad-Name",
        f"postgresql://app:{CANARY}@db/jobs?migrate=perhaps",
        f"postgresql://app:{CANARY}@db/jobs?pool_size=1",
        f"amqp://guest:{CANARY}@localhost/",
        f"sqlite://user:{CANARY}@host/jobs.db",
    ],
)
def test_url_errors_never_show_the_password(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        broker_from_url(url)
    assert CANARY not in str(info.value)
    assert "***" in str(info.value)


def test_reprs_never_show_the_password() -> None:
    for url in (
        f"redis://default:{CANARY}@127.0.0.1:6390/0",
        f"postgresql://app:{CANARY}@127.0.0.1:5432/jobs",
        f"postgresql://app@127.0.0.1:5432/jobs?password={CANARY}",
    ):
        app = App(url)
        assert CANARY not in repr(app) and CANARY not in repr(app.broker), (app, app.broker)


# --- the loader ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "instead"),
    [
        ("./app.py", "app:app"),
        ("app.py", "app:app"),
        ("src/myapp/tasks.py:application", "src.myapp.tasks:application"),
    ],
)
def test_a_file_path_for_the_app_says_to_use_module_colon_attribute(
    path: str, instead: str
) -> None:
    with pytest.raises(ConfigurationError) as info:
        load_app(path)
    assert str(info.value) == (
        f"{path!r} is a file path; name the app as module:attribute, e.g. {instead} "
        "(imported from the working directory, like python -m)"
    )
