"""What the web application is configured with: who may do what, and what it hides."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from starlette.requests import Request

    from taskmill.web.context import User

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
    """

    users: Mapping[str, str] = field(default_factory=dict)
    read_only_users: Mapping[str, str] = field(default_factory=dict)
    tokens: Sequence[str] = ()
    read_only_tokens: Sequence[str] = ()
    authenticate: Authenticate | None = None
    redact: Sequence[str] = REDACTED_NAMES
    title: str = "taskmill"
    extra: Mapping[str, Any] = field(default_factory=dict)

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
