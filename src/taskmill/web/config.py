"""What the web application is configured with: who may do what, and what it hides."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from taskmill.errors import ConfigurationError

if TYPE_CHECKING:
    from starlette.requests import Request


@dataclass(frozen=True)
class User:
    """Who made a request. ``can_write`` False: a read-only user, refused every action (403)."""

    name: str
    can_write: bool = True


Authenticate = Callable[["Request"], "User | Awaitable[User | None] | None"]
"""The host application's own auth: the request's user, or None (refused)."""

REDACTED_NAMES = ("password", "passwd", "secret", "token", "api_key", "apikey", "authorization")
"""Argument and field names whose values are hidden wherever they are shown, by default."""


@dataclass(frozen=True)
class WebConfig:
    """Auth and display options of ``create_app``.

    ``users`` / ``read_only_users``: HTTP basic auth, name to password. ``tokens`` /
    ``read_only_tokens``: bearer tokens for the API. ``authenticate``: the host application's
    own check (a callable given the request, returning a ``User`` or None), tried first.
    ``redact``: names (matched case-insensitively, as substrings) whose values are shown as
    ``"[redacted]"``. With none of the auth options set, only loopback clients get in.
    ``health_timeout_s``: how long ``/health`` and ``/ready`` wait for the broker.

    ``WebConfig.from_env()`` reads the ``TASKMILL_DASHBOARD_*`` settings:

    >>> config = WebConfig.from_env({"TASKMILL_DASHBOARD_USERS": "ops:a long secret",
    ...                              "TASKMILL_DASHBOARD_READ_ONLY_TOKENS": "t1, t2"})
    >>> dict(config.users), config.read_only_tokens, config.has_auth
    ({'ops': 'a long secret'}, ('t1', 't2'), True)
    """

    users: Mapping[str, str] = field(default_factory=dict)
    read_only_users: Mapping[str, str] = field(default_factory=dict)
    tokens: Sequence[str] = ()
    read_only_tokens: Sequence[str] = ()
    authenticate: Authenticate | None = None
    redact: Sequence[str] = REDACTED_NAMES
    title: str = "taskmill"
    health_timeout_s: float = 2.0
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        both = sorted(set(self.users) & set(self.read_only_users))
        if both:
            raise ConfigurationError(
                f"users {both} are both read-only and not: list each name in one of users= "
                "and read_only_users="
            )
        for name in (*self.users, *self.read_only_users):
            if not name or ":" in name:
                raise ConfigurationError(
                    f"user name {name!r}: HTTP basic auth needs a name without ':'"
                )
        secrets = [*self.users.values(), *self.read_only_users.values()]
        secrets += [*self.tokens, *self.read_only_tokens]
        if any(not secret for secret in secrets):
            raise ConfigurationError("an empty password or token would let anyone in")
        if not self.health_timeout_s > 0:
            raise ConfigurationError(
                f"health_timeout_s must be more than 0 seconds, not {self.health_timeout_s!r}"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **options: Any) -> WebConfig:
        """A configuration from ``TASKMILL_DASHBOARD_USERS`` and
        ``TASKMILL_DASHBOARD_READ_ONLY_USERS`` (``"name:password,name2:password2"``),
        ``TASKMILL_DASHBOARD_TOKENS`` and ``TASKMILL_DASHBOARD_READ_ONLY_TOKENS``
        (``"token1,token2"``), in ``environ`` (default: ``os.environ``); ``options`` are
        other fields, and add to what the environment gives."""
        env = os.environ if environ is None else environ
        from_env = cls(
            users=_pairs(env, "TASKMILL_DASHBOARD_USERS"),
            read_only_users=_pairs(env, "TASKMILL_DASHBOARD_READ_ONLY_USERS"),
            tokens=_items(env, "TASKMILL_DASHBOARD_TOKENS"),
            read_only_tokens=_items(env, "TASKMILL_DASHBOARD_READ_ONLY_TOKENS"),
        )
        merged: dict[str, Any] = dict(options)
        for name in ("users", "read_only_users"):
            if name in merged:
                merged[name] = {**getattr(from_env, name), **merged[name]}
        for name in ("tokens", "read_only_tokens"):
            if name in merged:
                merged[name] = (*getattr(from_env, name), *merged[name])
        return replace(from_env, **merged)

    @property
    def has_auth(self) -> bool:
        """Whether any way to authenticate is configured (else: loopback only)."""
        return bool(
            self.users
            or self.read_only_users
            or self.tokens
            or self.read_only_tokens
            or self.authenticate
        )


def _items(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """A comma-separated setting's items, blanks around them dropped."""
    return tuple(item.strip() for item in env.get(name, "").split(",") if item.strip())


def _pairs(env: Mapping[str, str], name: str) -> dict[str, str]:
    """``name:password`` items (the password may hold ':' but not ',')."""
    pairs = {}
    for item in _items(env, name):
        user, sep, password = item.partition(":")
        if not sep or not user or not password:
            # the item is likely a secret: name the position, never the text
            position = _items(env, name).index(item) + 1
            raise ConfigurationError(
                f"{name}: item {position} is not 'name:password' (items are separated by ',')"
            )
        pairs[user] = password
    return pairs
