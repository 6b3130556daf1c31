"""What a ``nats://`` URL says, and the names of everything the broker keeps on the server.

Every stream, bucket and subject carries the URL's ``prefix`` (default ``taskmill``), so two
apps share a server without seeing each other's jobs. Queue names, priorities and job ids become
subject tokens and KV keys through an injective encoding: a name of letters, digits and ``-``
is used as it is; anything else is ``_`` and its URL-safe base64 (a plain name never starts
with ``_``, so two names never meet).

>>> config = parse_url("nats://127.0.0.1:4222?prefix=shop&replicas=3")
>>> config.servers, config.prefix, config.replicas
(['nats://127.0.0.1:4222'], 'shop', 3)
>>> parse_url("nats://10.0.0.1:4222,nats://10.0.0.2:4222").servers
['nats://10.0.0.1:4222', 'nats://10.0.0.2:4222']
>>> token("emails"), token("billing.eu")
('emails', '_YmlsbGluZy5ldQ')
>>> priority_token(-3), priority_of_token("pn3")
('pn3', -3)
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

from taskmill.errors import ConfigurationError
from taskmill.urls import redact_url

Storage = Literal["file", "memory"]
Schedules = Literal["auto", "server", "workers"]

_PLAIN = re.compile(r"[A-Za-z0-9-]+\Z")
_PREFIX = re.compile(r"[A-Za-z0-9-]{1,32}\Z")
_OPTIONS = (
    "prefix", "replicas", "storage", "schedules", "unavailable_after", "ack_wait",
    "tls", "tls_ca", "tls_cert", "tls_key", "tls_hostname",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class NatsConfig:
    servers: list[str]
    """The URLs nats-py connects to (credentials included; never logged)."""
    prefix: str = "taskmill"
    replicas: int = 1
    """Replicas of every stream and bucket (1, or 3 on a cluster of 3 or more)."""
    storage: Storage = "file"
    schedules: Schedules = "auto"
    """``server``: delays fire as the server's scheduled messages (nats-server >= 2.12);
    ``workers``: a promoter in the workers moves due jobs; ``auto``: the server's if it has
    them."""
    unavailable_after_s: float = 10.0
    """How long a call retries a lost connection before ``BrokerUnavailableError``."""
    ack_wait_s: float = 30.0
    """How long a dispatch message taken by a worker that then died waits to be handed out
    again (a claim acknowledges it at once, so this only bounds a crash mid-claim)."""
    tls: bool = False
    """Connect over TLS only (``tls=true`` or a ``tls_*`` option): a server that does not
    require TLS is refused rather than spoken to in clear."""
    tls_ca: str | None = None
    """A CA bundle (PEM) to verify the server's certificate with, instead of the system's."""
    tls_cert: str | None = None
    """A client certificate (PEM), for servers that verify clients (``verify: true``)."""
    tls_key: str | None = None
    """The client certificate's key (PEM); may be in ``tls_cert``'s file instead."""
    tls_hostname: str | None = None
    """The name to check the server's certificate against, when not the URL's host."""

    @property
    def where(self) -> str:
        """host:port of each server, for messages (never a password)."""
        return ",".join(redact_url(s).split("://", 1)[-1].split("@")[-1] for s in self.servers)

    # --- names on the server --------------------------------------------------------------

    @property
    def dispatch_stream(self) -> str:
        return f"{self.prefix}_dispatch"

    def bucket(self, what: str) -> str:
        """The KV bucket of ``what``: ``jobs``, ``keys``, ``leases``, ``workers``,
        ``queues``, ``misc``, ``workflows``."""
        return f"{self.prefix}_{what}"

    def lane_subject(self, queue: str, priority: int, *, redo: bool = False) -> str:
        """A lane's subject; ``redo``: its redo lane, where recovered jobs go (see
        ``consumer_name``)."""
        return f"{self.prefix}.d.{token(queue)}.{priority_token(priority)}{_REDO if redo else ''}"

    def schedule_subject(self, job_id: str) -> str:
        return f"{self.prefix}.s.{token(job_id)}"

    def delayed_subject(self, minute: int) -> str:
        """Where the workers' promoter keeps jobs due in that minute (``schedules=workers``)."""
        return f"{self.prefix}.t.{minute}"

    def wake_subject(self, queue: str) -> str:
        """Where every idle worker hears "look at this queue's lanes again" (a lane made, a
        queue resumed)."""
        return f"{self.prefix}.wake.{token(queue)}"

    def ready_subject(self, queue: str) -> str:
        """Where a job made ready in the queue is announced, to the waits that hold no long
        pull (``run_until_idle``); the others' long pulls bring the job itself."""
        return f"{self.prefix}.ready.{token(queue)}"

    @property
    def events_subject(self) -> str:
        return f"{self.prefix}.events"


def token(name: str) -> str:
    """``name`` as a subject token, KV key part and consumer name part (injective)."""
    if _PLAIN.match(name):
        return name
    return "_" + base64.urlsafe_b64encode(name.encode()).decode().rstrip("=")


def untoken(tok: str) -> str:
    """The name ``token`` made ``tok`` from.

    >>> untoken(token("a.b c")), untoken("plain")
    ('a.b c', 'plain')
    """
    if not tok.startswith("_"):
        return tok
    raw = tok[1:]
    return base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()


def priority_token(priority: int) -> str:
    return f"pn{-priority}" if priority < 0 else f"p{priority}"


def priority_of_token(tok: str) -> int:
    """The priority of a lane's token, its redo lane's too (``p3r``: 3)."""
    tok = tok.removesuffix(_REDO)
    return -int(tok[2:]) if tok.startswith("pn") else int(tok[1:])


def consumer_name(queue: str, priority: int, *, redo: bool = False) -> str:
    """The durable pull consumer of a lane (a queue at one priority), or of its redo lane
    (``redo``), where recovered jobs go. A lane is a stream, so a pointer sent again would
    wait behind every job sent since; the redo lane is pulled with its lane, and a claim takes
    the oldest ``run_at`` of both first, so a recovered job keeps its place, as on the other
    brokers.

    >>> consumer_name("emails", 0), consumer_name("emails", -3, redo=True)
    ('emails_p0', 'emails_pn3r')
    """
    return f"{token(queue)}_{priority_token(priority)}{_REDO if redo else ''}"


_REDO = "r"


def parse_url(url: str) -> NatsConfig:
    """``nats://[user:password@]host:port[,host:port...][?prefix=...&replicas=...&storage=file|
    memory&schedules=auto|server|workers&unavailable_after=SECONDS&ack_wait=SECONDS]``;
    ``tls=true`` for TLS with the system's CAs; ``tls_ca=PATH``, ``tls_cert=PATH&tls_key=PATH``
    and ``tls_hostname=NAME`` each imply TLS.

    >>> config = parse_url("nats://u:p@nats.internal:4222?tls_ca=/etc/ca.pem")
    >>> config.servers, config.tls, config.tls_ca
    (['nats://u:p@nats.internal:4222'], True, '/etc/ca.pem')
    """
    # "nats://a:4222,nats://b:4222" (as nats-py's docs write a cluster) means "nats://a,b"
    url = url[:7] + url[7:].replace(",nats://", ",")
    parts = urlsplit(url)
    if parts.scheme.lower() != "nats":
        raise ConfigurationError(f"not a nats:// URL: {redact_url(url)!r}")
    options = dict(parse_qsl(parts.query))
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise ConfigurationError(
            f"unknown option(s) {', '.join(unknown)} in {redact_url(url)!r}; "
            f"known: {', '.join(_OPTIONS)}"
        )
    netloc = parts.netloc or "127.0.0.1:4222"
    userinfo, _, hosts = netloc.rpartition("@")
    auth = f"{userinfo}@" if userinfo else ""
    servers = [f"nats://{auth}{host}" for host in hosts.split(",") if host]
    prefix = options.get("prefix", "taskmill")
    if not _PREFIX.match(prefix):
        raise ConfigurationError(f"prefix must be 1 to 32 letters, digits or '-', not {prefix!r}")
    storage = options.get("storage", "file")
    if storage not in ("file", "memory"):
        raise ConfigurationError(f"storage must be 'file' or 'memory', not {storage!r}")
    schedules = options.get("schedules", "auto")
    if schedules not in ("auto", "server", "workers"):
        raise ConfigurationError(
            f"schedules must be 'auto', 'server' or 'workers', not {schedules!r}"
        )
    return NatsConfig(
        servers=servers,
        prefix=prefix,
        replicas=_number(options, "replicas", 1, int, 1, 5),
        storage=storage,  # type: ignore[arg-type]  # checked above
        schedules=schedules,  # type: ignore[arg-type]
        unavailable_after_s=_number(options, "unavailable_after", 10.0, float, 0.1, 3600.0),
        ack_wait_s=_number(options, "ack_wait", 30.0, float, 1.0, 3600.0),
        tls=_flag(options, "tls") or any(k.startswith("tls_") for k in options),
        tls_ca=options.get("tls_ca"),
        tls_cert=options.get("tls_cert"),
        tls_key=options.get("tls_key"),
        tls_hostname=options.get("tls_hostname"),
    )


def _flag(options: dict[str, str], name: str) -> bool:
    raw = options.get(name, "false").strip().lower()
    if raw not in ("true", "1", "yes", "false", "0", "no"):
        raise ConfigurationError(f"{name} must be true or false, not {raw!r}")
    return raw in ("true", "1", "yes")


def _number(
    options: dict[str, str], name: str, default: Any, kind: type, low: float, high: float
) -> Any:
    raw = options.get(name)
    if raw is None:
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise ConfigurationError(f"{name} must be a number from {low:g} to {high:g}, not {raw!r}")
    return value
