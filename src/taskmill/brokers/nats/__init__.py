"""The NATS JetStream broker (``nats://``; extra ``nats``: nats-py). See ``broker.py``."""

from taskmill.brokers.nats.broker import NatsBroker
from taskmill.brokers.nats.config import NatsConfig, parse_url

__all__ = ["NatsBroker", "NatsConfig", "parse_url"]
