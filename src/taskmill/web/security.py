"""Who may use the dashboard and the API, and the headers that keep a browser safe.

One ASGI middleware (``SecurityMiddleware``), added by ``create_app``, in front of every route:

1. **Auth.** The host application's ``authenticate`` hook first (sync or async; a ``User`` or
   None); then a bearer token (``Authorization: Bearer ...``) or HTTP basic credentials. Every
   secret is compared in constant time (``hmac.compare_digest``), against every configured one
   (an unknown name costs what a known one does), and is never logged. With no auth configured,
   only loopback clients get in, as an anonymous admin (``request.state.user`` is None).
   ``/health`` and ``/ready`` need no login: probes cannot log in, and they show only counts
   per queue.
2. **Read-only users** are refused every state-changing request (403).
3. **Cross-site requests.** A POST, PUT, PATCH or DELETE is refused (403) when the browser
   says it comes from another site (``Sec-Fetch-Site: cross-site`` or ``same-site``), or when
   it has an ``Origin`` that is not the request's own. Requests with neither header (curl, API
   clients) pass: a browser always sends one of them with a POST. GET never changes state.
4. **Headers on every response**: a strict Content-Security-Policy whose script nonce is fresh
   per request (``request.state.csp_nonce``, see ``taskmill.web.context.csp_nonce``),
   ``X-Content-Type-Options: nosniff``, ``Referrer-Policy: same-origin``, and
   ``X-Frame-Options: DENY`` for browsers without ``frame-ancestors``.

``check_bind`` is the rule for serving it: a host that is not loopback needs auth.

>>> from taskmill.web.config import WebConfig
>>> check_bind("127.0.0.1", WebConfig())
>>> check_bind("0.0.0.0", WebConfig())
Traceback (most recent call last):
taskmill.errors.ConfigurationError: refusing to serve the dashboard on 0.0.0.0 without auth: ...
"""

from __future__ import annotations

import base64
import binascii
import hmac
import inspect
import ipaddress
import json
import logging
import secrets
from collections.abc import Iterable
from typing import TYPE_CHECKING

from starlette.requests import Request

from taskmill.errors import ConfigurationError
from taskmill.web.config import User

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from taskmill.web.config import WebConfig

log = logging.getLogger("taskmill.web")

PUBLIC_PATHS = frozenset({"/health", "/ready"})
"""Paths anyone may read, logged in or not (probes); they show counts per queue only."""
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_FOREIGN_SITES = frozenset({"cross-site", "same-site"})
_REALM = 'Basic realm="taskmill", charset="UTF-8"'
# what an unknown user name's password is compared against, so that costs what a known one does
_NO_SECRET = secrets.token_bytes(32)


def content_security_policy(nonce: str) -> str:
    """The policy of every response: only this origin's scripts, and inline ones carrying
    ``nonce``; no plugins, no framing, no ``<base>``, forms post only here."""
    return (
        "default-src 'self'; "
        f"script-src 'self' 'nonce-{nonce}'; "
        "object-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    )


def is_loopback(host: str | None) -> bool:
    """127.0.0.0/8, ::1 (also as an IPv4-mapped address) and ``localhost``."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def check_bind(host: str, config: WebConfig) -> None:
    """``ConfigurationError`` if serving on ``host`` would let anyone who can reach it in:
    a host that is not loopback needs auth configured."""
    if is_loopback(host) or config.has_auth:
        return
    raise ConfigurationError(
        f"refusing to serve the dashboard on {host} without auth: anyone who can reach it "
        "could retry, cancel and purge jobs. Configure users or tokens (--user, --token, or "
        "TASKMILL_DASHBOARD_USERS / TASKMILL_DASHBOARD_TOKENS), or serve on 127.0.0.1"
    )


def route_path(scope: Scope) -> str:
    """The path inside this application (without the prefix it is mounted under)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        return path[len(root) :] or "/"
    return path


class Refusal(Exception):
    """A request the middleware answers itself: status, message, extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class SecurityMiddleware:
    """Auth, the read-only role, the cross-site check and the security headers (see the
    module's docstring), in front of ``app``."""

    def __init__(self, app: ASGIApp, config: WebConfig) -> None:
        self.app = app
        self.config = config
        self._basic = _Secrets(
            [(name, pw, True) for name, pw in config.users.items()]
            + [(name, pw, False) for name, pw in config.read_only_users.items()]
        )
        self._bearer = _Secrets(
            [(f"token-{n}", t, True) for n, t in enumerate(config.tokens, 1)]
            + [(f"read-only-token-{n}", t, False) for n, t in enumerate(config.read_only_tokens, 1)]
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        nonce = secrets.token_urlsafe(16)
        request.state.csp_nonce = nonce
        send = _with_headers(send, nonce)
        try:
            if route_path(scope) not in PUBLIC_PATHS:
                request.state.user = await self.authenticate(request)
                if request.method in UNSAFE_METHODS:
                    self.check_write(request)
        except Refusal as refusal:
            await _refuse(refusal, send)
            return
        await self.app(scope, receive, send)

    async def authenticate(self, request: Request) -> User | None:
        """The request's user; None for an anonymous loopback client when no auth is
        configured; a ``Refusal`` otherwise."""
        hook = self.config.authenticate
        if hook is not None:
            found = hook(request)
            user = await found if inspect.isawaitable(found) else found
            if user is not None:
                return user
        user = self._credentials(request.headers.get("authorization", ""))
        if user is not None:
            return user
        client = request.client.host if request.client else None
        if self.config.has_auth:
            raise Refusal(401, "log in: this dashboard needs a user or a token",
                          {"WWW-Authenticate": _REALM})  # fmt: skip
        if is_loopback(client):
            return None
        raise Refusal(
            403,
            "this dashboard has no auth configured, so only loopback clients may use it; "
            "configure users or tokens (TASKMILL_DASHBOARD_USERS, TASKMILL_DASHBOARD_TOKENS)",
        )

    def _credentials(self, header: str) -> User | None:
        scheme, _, value = header.partition(" ")
        scheme, value = scheme.lower(), value.strip()
        if scheme == "bearer" and value:
            return self._bearer.match(None, value)
        if scheme == "basic" and value:
            try:
                decoded = base64.b64decode(value, validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                raise Refusal(401, "malformed basic credentials: base64 of 'name:password'",
                              {"WWW-Authenticate": _REALM}) from None  # fmt: skip
            name, _, password = decoded.partition(":")
            return self._basic.match(name, password)
        return None

    def check_write(self, request: Request) -> None:
        """Refuse a state-changing request from a read-only user or from another site."""
        user: User | None = request.state.user
        if user is not None and not user.can_write:
            raise Refusal(403, f"user {user.name!r} is read-only")
        site = request.headers.get("sec-fetch-site")
        if site in _FOREIGN_SITES:
            raise Refusal(403, f"cross-site request refused (Sec-Fetch-Site: {site})")
        origin = request.headers.get("origin")
        if origin is not None and _origin(origin) != _own_origin(request):
            raise Refusal(403, "cross-site request refused: its Origin is not this site")


class _Secrets:
    """Named secrets, each with the role it grants, matched in constant time."""

    def __init__(self, entries: Iterable[tuple[str, str, bool]]) -> None:
        self.entries = [(name, secret.encode(), can_write) for name, secret, can_write in entries]

    def match(self, name: str | None, given: str) -> User | None:
        """The user whose secret is ``given`` (and whose name is ``name``, for basic auth).
        Every entry is compared, so the time taken says nothing about which one matched."""
        candidate = given.encode()
        found: User | None = None
        for entry_name, secret, can_write in self.entries:
            same_name = name is None or hmac.compare_digest(entry_name.encode(), name.encode())
            same_secret = hmac.compare_digest(secret, candidate)
            if same_name and same_secret and found is None:
                found = User(entry_name, can_write)
        if not self.entries:
            hmac.compare_digest(_NO_SECRET, candidate)
        return found


def _with_headers(send: Send, nonce: str) -> Send:
    headers = [
        (b"content-security-policy", content_security_policy(nonce).encode()),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"same-origin"),
        (b"x-frame-options", b"DENY"),
    ]
    ours = {name for name, _ in headers}

    async def send_with_headers(message: Message) -> None:
        if message["type"] == "http.response.start":
            kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in ours]
            message = {**message, "headers": kept + headers}
        await send(message)

    return send_with_headers


async def _refuse(refusal: Refusal, send: Send) -> None:
    body = json.dumps({"error": refusal.message}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
    ] + [(k.lower().encode(), v.encode()) for k, v in refusal.headers.items()]
    await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


_DEFAULT_PORTS = {"http": "80", "https": "443"}


def _origin(text: str) -> str:
    """``scheme://host[:port]``, lower case, without the scheme's default port."""
    scheme, sep, rest = text.strip().lower().partition("://")
    if not sep:
        return text  # "null" (a sandboxed or file page) or garbage: matches nothing
    host = rest.split("/", 1)[0]
    default = _DEFAULT_PORTS.get(scheme)
    if default is not None and host.endswith(f":{default}"):
        host = host[: -len(default) - 1]
    return f"{scheme}://{host}"


def _own_origin(request: Request) -> str:
    host = request.headers.get("host") or (request.url.netloc)
    return _origin(f"{request.url.scheme}://{host}")


__all__ = [
    "PUBLIC_PATHS",
    "SecurityMiddleware",
    "check_bind",
    "content_security_policy",
    "is_loopback",
]
