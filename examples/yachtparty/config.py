"""The processor's settings, read from the environment (as the seed's service read its own)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from examples._support.env import env_seconds
from taskmill.urls import redact_url


class ConfigError(RuntimeError):
    """A setting is missing or not valid; the message names it."""


def _number(env: dict[str, str], name: str, default: float) -> float:
    return env_seconds(env, name, default, error=ConfigError)


@dataclass(frozen=True)
class Config:
    """Everything the web service and the workers must agree on.

    ``minute_s`` is how long a minute of the retry policy lasts: 60 in production, less in a
    test or a demo that wants to watch the 1/2/4-minute retries happen. It scales every delay
    the processor derives from minutes and leaves their ratios alone.
    """

    database_url: str
    services_url: str = "http://127.0.0.1:8099"
    minute_s: float = 60.0
    lease_s: float = 30.0
    http_timeout_s: float = 5.0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Config:
        """``DATABASE_URL`` (else ``TASKMILL_URL``), ``YACHTPARTY_SERVICES_URL``,
        ``YACHTPARTY_MINUTE_S``, ``YACHTPARTY_LEASE_S``, ``YACHTPARTY_HTTP_TIMEOUT_S``."""
        env = dict(os.environ) if env is None else env
        url = env.get("DATABASE_URL") or env.get("TASKMILL_URL") or ""
        if not url.startswith(("postgresql://", "postgres://")):
            given = f"not {redact_url(url)!r}" if url else "it is not set"
            raise ConfigError(
                "the task processor needs PostgreSQL (its own rows and the jobs are written in "
                f"one transaction): set DATABASE_URL to postgresql://user@host:port/db; {given}"
            )
        return cls(
            database_url=url,
            services_url=env.get("YACHTPARTY_SERVICES_URL") or cls.services_url,
            minute_s=_number(env, "YACHTPARTY_MINUTE_S", cls.minute_s),
            lease_s=_number(env, "YACHTPARTY_LEASE_S", cls.lease_s),
            http_timeout_s=_number(env, "YACHTPARTY_HTTP_TIMEOUT_S", cls.http_timeout_s),
        )

    def to_env(self) -> dict[str, str]:
        """The same settings as environment variables, for worker processes."""
        return {
            "DATABASE_URL": self.database_url,
            "YACHTPARTY_SERVICES_URL": self.services_url,
            "YACHTPARTY_MINUTE_S": repr(self.minute_s),
            "YACHTPARTY_LEASE_S": repr(self.lease_s),
            "YACHTPARTY_HTTP_TIMEOUT_S": repr(self.http_timeout_s),
        }
