"""The one settings object. Units are in the names; unknown options are an error."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from taskmill.errors import ConfigurationError
from taskmill.names import check_name

MISSED_HEARTBEATS = 3
"""A worker whose last heartbeat is older than this many of its intervals is lost (it died
without signing off): the rule of ``taskmill workers``, ``app.workers()``, ``taskmill ping``
and the liveness endpoints."""


@dataclass(frozen=True, slots=True)
class Settings:
    lease_s: float = 30.0
    """How long a claim is valid without a heartbeat; a dead worker's jobs return after this."""
    heartbeat_s: float | None = None
    """How often a worker renews its leases (default: a third of ``lease_s``, at most 2 s)."""
    max_lost_leases: int = 3
    """A job whose lease expired this many times is failed as a poison job, not run again."""
    recover_interval_s: float | None = None
    """How often each worker looks for expired leases (default: ``lease_s / 2``, at most 5 s)."""
    result_ttl_s: float = 7 * 24 * 3600.0
    """Finished jobs (with results and errors) are pruned this long after they finish."""
    prune_interval_s: float = 60.0
    max_payload_bytes: int = 1 << 20
    """Largest JSON of a job's arguments accepted at enqueue."""
    default_queue: str = "default"
    events: bool = False
    """Publish every job's transitions and progress as live events (``taskmill.events``)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # before the comparisons below, which assume types
            _check_type(f, getattr(self, f.name))
        rules = (
            (self.lease_s > 0, "lease_s must be > 0"),
            (
                self.heartbeat_s is None or 0 < self.heartbeat_s < self.lease_s,
                "heartbeat_s must be > 0 and shorter than lease_s (here heartbeat_s="
                f"{self.heartbeat_s!r}, lease_s={self.lease_s!r})",
            ),
            (self.max_lost_leases >= 1, "max_lost_leases must be >= 1"),
            (self.max_payload_bytes >= 64, "max_payload_bytes must be >= 64"),
            (
                self.result_ttl_s >= 0 and self.prune_interval_s > 0,
                "result_ttl_s must be >= 0 and prune_interval_s > 0",
            ),
        )
        for holds, message in rules:
            if not holds:
                raise ConfigurationError(message)
        check_name("queue", self.default_queue)

    @property
    def effective_heartbeat_s(self) -> float:
        return self.heartbeat_s if self.heartbeat_s is not None else min(self.lease_s / 3, 2.0)

    @property
    def lost_after_s(self) -> float:
        """A worker silent this long is lost (``MISSED_HEARTBEATS`` heartbeat intervals)."""
        return MISSED_HEARTBEATS * self.effective_heartbeat_s

    @property
    def effective_recover_interval_s(self) -> float:
        if self.recover_interval_s is not None:
            return self.recover_interval_s
        return min(self.lease_s / 2, 5.0)

    def with_lease(self, lease_s: float) -> Settings:
        """These settings with another ``lease_s`` (one worker's, ``taskmill worker
        --lease``): the heartbeat and recovery intervals follow it unless set explicitly.
        ``ConfigurationError`` if the rules refuse it (a lease not longer than an explicit
        ``heartbeat_s``).

        >>> Settings(lease_s=30).with_lease(3).effective_heartbeat_s
        1.0
        """
        return dataclasses.replace(self, lease_s=lease_s)

    @classmethod
    def build(cls, options: dict[str, Any]) -> Settings:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigurationError(
                f"unknown App option(s) {unknown}; known options: {', '.join(sorted(known))}"
            )
        return cls(**options)


def _check_type(f: dataclasses.Field[Any], value: Any) -> None:
    """A setting has its field's type: text, True/False, or a number (bools are not numbers
    here); an optional number may be None."""
    if f.type == "str":
        ok, kind = isinstance(value, str), "a string"
    elif f.type == "bool":
        ok, kind = isinstance(value, bool), "True or False"
    else:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        ok, kind = number or (value is None and f.default is None), "a number"
    if not ok:
        raise ConfigurationError(f"{f.name} must be {kind}, not {value!r}")
