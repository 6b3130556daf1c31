"""Showing a broker URL without its secrets: every log line, message and ``repr`` that names a
URL goes through ``redact_url``."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import parse_qsl, unquote, urlsplit

MASK = "***"

_QUERY_SECRET = re.compile(r"(?P<key>(?:^|[?&;])password=)(?P<secret>[^&;#]*)", re.IGNORECASE)


def _password_span(url: str) -> tuple[int, int] | None:
    """Where the password of ``scheme://user:password@host`` is, as urllib splits it."""
    start = url.find("://")
    if start < 0:
        return None
    start += 3
    host_end = min((i for i in (url.find(c, start) for c in "/?#") if i >= 0), default=len(url))
    at = url.rfind("@", start, host_end)
    if at < 0:
        # an unescaped "/", "?" or "#" in the password ends the host part early (drivers
        # misread such a URL too): mask up to the last "@" rather than show part of it
        at = url.rfind("@", start)
        if at < 0:
            return None
    colon = url.find(":", start, at)
    return None if colon < 0 else (colon + 1, at)


def redact_url(url: str) -> str:
    """The URL with its password (``user:password@`` and ``password=`` options) as ``***``.

    >>> redact_url("redis://default:S3CRET@cache.internal:6379/0")
    'redis://default:***@cache.internal:6379/0'
    >>> redact_url("postgresql://app@db/jobs?sslmode=require&password=S3CRET")
    'postgresql://app@db/jobs?sslmode=require&password=***'
    >>> redact_url("sqlite:///jobs.db")
    'sqlite:///jobs.db'
    """
    span = _password_span(url)
    if span is not None:
        url = url[: span[0]] + MASK + url[span[1] :]
    return _QUERY_SECRET.sub(lambda m: m["key"] + MASK, url)


def url_secrets(url: str) -> list[str]:
    """The secrets a URL holds, as written and percent-decoded (to scrub other text)."""
    found: list[str] = []
    span = _password_span(url)
    if span is not None:
        found.append(url[span[0] : span[1]])
    found += [m["secret"] for m in _QUERY_SECRET.finditer(url)]
    found += [unquote(s) for s in found]
    return [s for s in dict.fromkeys(found) if s and s != MASK]


def scrub(text: str, url: str) -> str:
    """``text`` (a driver's error message, say) with the URL's secrets masked. Drivers do not
    quote passwords in their errors today; this keeps it so. Secrets shorter than 4 characters
    are left alone: masking every "a" of a message would hide more than it protects.

    >>> scrub("cannot log in with S3CRET!", "redis://:S3CRET%21@localhost")
    'cannot log in with ***'
    """
    for secret in sorted(url_secrets(url), key=len, reverse=True):
        if len(secret) >= 4:
            text = text.replace(secret, MASK)
    return text


_TLS_SSLMODES = {"require", "verify-ca", "verify-full"}


def _loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host in ("", "localhost") or host.startswith("/"):  # "" and "/...": a Unix socket
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure(url: str) -> str | None:
    """What is missing for a broker URL to be safe on a network: None for a broker on this
    machine (loopback, a Unix socket, SQLite, memory), else "TLS", "credentials" or both,
    as the URL shows them (a PostgreSQL password may also come from ``PGPASSWORD`` or
    ``~/.pgpass``, so only TLS is asked of a PostgreSQL URL).

    >>> exposure("redis://10.0.0.5:6379/0")
    'TLS and credentials'
    >>> exposure("rediss://:pw@cache.internal:6380/0") is None
    True
    >>> exposure("postgresql://app@db.internal/app?sslmode=verify-full") is None
    True
    >>> exposure("nats://app:pw@127.0.0.1:4222") is None
    True
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    options = dict(parse_qsl(parts.query))
    netloc = parts.netloc.rpartition("@")[2]
    hosts = [_host_of(h) for h in netloc.split(",")]
    if scheme in ("redis", "rediss", "valkey", "valkeys"):
        tls = scheme in ("rediss", "valkeys")
        credentials = bool(url_secrets(url))
    elif scheme in ("postgresql", "postgres"):
        if "host" in options:  # libpq's host= option (several: comma-separated)
            hosts = [_host_of(h) for h in options["host"].split(",")]
        tls = options.get("sslmode", "").lower() in _TLS_SSLMODES
        credentials = True
    elif scheme == "nats":
        tls = options.get("tls", "").lower() in ("true", "1", "yes") or any(
            k.startswith("tls_") for k in options
        )
        credentials = "@" in parts.netloc
    else:
        return None
    if all(_loopback(h) for h in hosts):
        return None
    missing = [what for what, ok in (("TLS", tls), ("credentials", credentials)) if not ok]
    return " and ".join(missing) or None


def _host_of(hostport: str) -> str:
    """The host of ``host``, ``host:port``, ``[v6]`` or ``[v6]:port``."""
    if hostport.startswith("["):
        return hostport[1 : hostport.find("]")]
    if hostport.count(":") == 1:
        return hostport.split(":")[0]
    return hostport
