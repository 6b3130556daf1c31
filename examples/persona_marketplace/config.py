"""The example's settings, one object handed to every part, and passed to the worker
processes as environment variables (``PERSONA_*``), since ``taskmill worker`` imports the app by
its ``module:attr`` path and cannot be given Python objects."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass

from examples._support.env import parse_seconds

ENV_PREFIX = "PERSONA_"


@dataclass(frozen=True)
class Config:
    """Where things are, and the time limits (seconds, as the names say)."""

    broker_url: str
    """The Redis URL of the taskmill broker (``redis://127.0.0.1:6379/0?prefix=persona:``)."""
    status_db: str
    """The app's own SQLite file holding the ingestion status rows the hooks write."""
    services_url: str
    """The base URL of the (fake) source and embedding services."""
    soft_limit_s: float = 25.0
    """An ingestion's soft time limit: it embeds what it has read, then gives up."""
    hard_limit_s: float = 30.0
    """An ingestion's hard time limit: the child process running it is killed."""
    lease_s: float = 30.0
    """How long a worker that stopped heartbeating keeps its jobs before another takes them."""
    http_timeout_s: float = 2.0
    """How long one call to a source may take before it counts as a timeout (retried)."""
    embed_timeout_s: float = 60.0
    """How long one call to the embedding service may take (it is slow on purpose)."""
    retry_base_s: float = 1.0
    """The first retry's delay; each next one doubles, up to 30 s (with jitter)."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        """Read ``PERSONA_BROKER_URL``, ``PERSONA_STATUS_DB``, ``PERSONA_SERVICES_URL`` (all
        three required) and the optional ``PERSONA_SOFT_LIMIT_S`` ... ``PERSONA_RETRY_BASE_S``.

        >>> Config.from_env({"PERSONA_BROKER_URL": "redis://h/0", "PERSONA_STATUS_DB": "s.db",
        ...                  "PERSONA_SERVICES_URL": "http://h:1", "PERSONA_LEASE_S": "3"}).lease_s
        3.0
        """
        env = os.environ if environ is None else environ
        values: dict[str, str | float] = {}
        for f in dataclasses.fields(cls):
            name = ENV_PREFIX + f.name.upper()
            raw = env.get(name)
            if raw is None:
                if f.default is dataclasses.MISSING:
                    raise KeyError(f"{name} is not set: the persona example needs it")
                continue
            values[f.name] = raw if f.type == "str" else parse_seconds(name, raw)
        return cls(**values)  # type: ignore[arg-type]

    def to_env(self) -> dict[str, str]:
        """The variables ``from_env`` reads back, for a worker subprocess's environment."""
        return {
            ENV_PREFIX + f.name.upper(): str(getattr(self, f.name))
            for f in dataclasses.fields(self)
        }
