"""Brokers by URL scheme. Each module is imported only when its scheme is used."""

from __future__ import annotations

from taskmill.brokers.base import Broker, Capabilities, EnqueueResult, HeartbeatReply
from taskmill.errors import ConfigurationError
from taskmill.urls import redact_url

__all__ = ["Broker", "Capabilities", "EnqueueResult", "HeartbeatReply", "broker_from_url"]


def broker_from_url(url: str) -> Broker:
    """Make (but do not connect) the broker a URL names.

    >>> broker_from_url("memory://").capabilities.shared_across_processes
    False
    """
    scheme = url.split(":", 1)[0].lower()
    if scheme == "memory":
        from taskmill.brokers.memory import MemoryBroker

        return MemoryBroker(url)
    if scheme == "sqlite":
        from taskmill.brokers.sqlite import SQLiteBroker

        return SQLiteBroker(url)
    if scheme in ("redis", "rediss", "valkey", "valkeys"):
        try:
            from taskmill.brokers.redis import RedisBroker
        except ImportError as exc:
            raise ConfigurationError(
                f"{redact_url(url)!r} needs redis-py: pip install 'taskmill[redis]' ({exc})"
            ) from None
        return RedisBroker(url)
    if scheme in ("postgresql", "postgres"):
        try:
            from taskmill.brokers.postgres import PostgresBroker
        except ImportError as exc:
            raise ConfigurationError(
                f"{redact_url(url)!r} needs psycopg 3: pip install 'taskmill[postgres]' ({exc})"
            ) from None
        return PostgresBroker(url)
    if scheme == "nats":
        try:
            from taskmill.brokers.nats import NatsBroker
        except ImportError as exc:
            raise ConfigurationError(
                f"{redact_url(url)!r} needs nats-py: pip install 'taskmill[nats]' ({exc})"
            ) from None
        return NatsBroker(url)
    raise ConfigurationError(
        f"no broker for URL {redact_url(url)!r}; supported schemes: memory://, sqlite:///path, "
        "redis:// (rediss://, valkey://), postgresql:// (postgres://), nats://"
    )
