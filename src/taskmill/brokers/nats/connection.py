"""One connection to NATS and the few JetStream operations the broker is made of.

nats-py's helpers (``js.publish``, ``kv.update``) cost a future, a semaphore and a JSON parse
each; the broker's hot paths instead publish with a reply subject under one wildcard inbox and
match replies by token (``Requests``): about twice the rate on the same core. KV buckets are
plain streams named as nats-py and the ``nats`` CLI expect (``KV_<bucket>``, subjects
``$KV.<bucket>.<key>``), read with direct gets and written with an expected last subject
sequence (compare-and-set).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import ssl
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import (
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import NotFoundError

from taskmill.brokers.nats.config import NatsConfig
from taskmill.errors import BrokerError, BrokerUnavailableError, ConfigurationError

log = logging.getLogger("taskmill.brokers.nats")

BUCKETS = ("jobs", "payloads", "keys", "leases", "workers", "queues", "misc", "workflows")
WRONG_LAST_SEQUENCE = (10071, 10164)
REQUEST_TIMEOUT_S = 5.0
ATOMIC_BATCH_MAX = 1000
"""The most messages nats-server takes in one atomic batch."""
ATOMIC_STREAMS = ("dispatch", "jobs")
"""The streams a bulk send writes with atomic batches (the dispatch stream and the jobs
bucket's): made with ``allow_atomic`` where the server has it."""


class CasError(Exception):
    """A compare-and-set lost: the key's revision was not the one expected."""


class Requests:
    """Request/reply over one wildcard inbox subscription: ``request`` publishes with a reply
    subject of its own token and waits for the one reply."""

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._inbox = nc.new_inbox()
        self._pending: dict[str, asyncio.Future[Msg]] = {}
        self._tokens = itertools.count()
        self._sub: Any = None

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self._inbox + ".*", cb=self._reply)

    async def _reply(self, msg: Msg) -> None:
        fut = self._pending.pop(msg.subject, None)
        if fut is not None and not fut.done():
            fut.set_result(msg)

    async def send(
        self, subject: str, payload: bytes, headers: dict[str, str] | None = None
    ) -> asyncio.Future[Msg]:
        """Publish now (nats-py buffers it) and return the future of the reply: many sends
        then one ``gather`` make one round trip of a batch."""
        reply = f"{self._inbox}.{next(self._tokens)}"
        fut: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._pending[reply] = fut
        fut.add_done_callback(lambda _: self._pending.pop(reply, None))
        await self._nc.publish(subject, payload, reply=reply, headers=headers)
        return fut

    async def send_batch(
        self, messages: Sequence[tuple[str, bytes, dict[str, str]]]
    ) -> asyncio.Future[Msg]:
        """Publish ``messages`` as one atomic batch (nats-server 2.12, on a stream that allows
        it): each without a reply but the last, whose reply (``batch_ack``) says the whole
        batch was stored, or why none of it was. At most ``ATOMIC_BATCH_MAX`` messages; the
        batch headers are added to the caller's.

        All but the last go to nats-py's write buffer as one write of frames made here
        (``hpub_frame``): its ``publish`` costs about 9 µs of Python a message with headers,
        most of it checking and encoding them one by one, several times what the server
        takes to store one. Connected, the buffer is what ``publish`` writes to as well, so
        the frames and the commit go out in this order; not connected, ``publish`` each."""
        batch = uuid.uuid4().hex
        for n, (_, _, headers) in enumerate(messages, 1):
            headers["Nats-Batch-Id"] = batch
            headers["Nats-Batch-Sequence"] = str(n)
        body, commit = messages[:-1], messages[-1]
        write = getattr(self._nc, "_send_command", None)
        if body and self._nc.is_connected and callable(write):
            await write(b"".join([hpub_frame(s, h, p) for s, p, h in body]))
        else:
            for subject, payload, headers in body:
                await self._nc.publish(subject, payload, headers=headers)
        subject, payload, headers = commit
        headers["Nats-Batch-Commit"] = "1"
        return await self.send(subject, payload, headers)

    async def request(
        self, subject: str, payload: bytes, headers: dict[str, str] | None = None,
        timeout: float = REQUEST_TIMEOUT_S,
    ) -> Msg:  # fmt: skip
        fut = await self.send(subject, payload, headers)
        try:
            async with asyncio.timeout(timeout):
                return await fut
        finally:
            if not fut.done():
                fut.cancel()

    async def replies(
        self, futures: list[asyncio.Future[Msg]], timeout: float = REQUEST_TIMEOUT_S
    ) -> list[Msg]:
        """The replies of ``send``s, in order; ``BrokerUnavailableError`` if one is still
        missing after ``timeout`` (a reply lost with a connection never comes)."""
        try:
            async with asyncio.timeout(timeout):
                return list(await asyncio.gather(*futures))
        except TimeoutError:
            for fut in futures:
                fut.cancel()
            raise BrokerUnavailableError(
                f"NATS did not answer {sum(not f.done() or f.cancelled() for f in futures)} of "
                f"{len(futures)} requests within {timeout:g} s"
            ) from None

    def fail_all(self, exc: BaseException) -> None:
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # whoever awaits it still gets it; nobody may: no warning


def ack_seq(msg: Msg) -> int:
    """The stream sequence a JetStream publish was stored at; ``CasError`` when an expected
    last subject sequence did not match; ``BrokerError`` for any other refusal."""
    reply = json.loads(msg.data) if msg.data else {}
    error = reply.get("error")
    if error is None:
        if not msg.data:
            raise BrokerUnavailableError(f"no JetStream answer for {msg.subject}: {msg.headers}")
        return int(reply["seq"])
    # 10071 "wrong last sequence: N"; a clustered stream may answer 10164 "wrong last sequence"
    if error.get("err_code") in WRONG_LAST_SEQUENCE or str(error.get("description", "")).startswith(
        "wrong last sequence"
    ):
        raise CasError(error.get("description", ""))
    raise BrokerError(f"NATS JetStream refused a write: {error.get('description', error)}")


_NEWLINES = str.maketrans({"\r": " ", "\n": " "})


def hpub_frame(subject: str, headers: Mapping[str, str], payload: bytes) -> bytes:
    """One message with headers and no reply, as the NATS protocol writes it (``HPUB``).
    ``subject`` and the header names are the broker's own (checked tokens). A value must be
    as nats-py would write it (``header_value``: a message id is then the same whichever way
    it was sent); one with a line break is refused rather than allowed to end it early.

    >>> hpub_frame("a.b", {"K": "v"}, b"xy")
    b'HPUB a.b 18 20\\r\\nNATS/1.0\\r\\nK: v\\r\\n\\r\\nxy\\r\\n'
    """
    lines = "".join([f"{k}: {v}\r\n" for k, v in headers.items()])
    head = f"NATS/1.0\r\n{lines}\r\n".encode()
    if head.count(b"\n") != len(headers) + 2 or head.count(b"\r") != len(headers) + 2:
        raise ValueError(f"a NATS header value with a line break: {headers}")
    size = len(head) + len(payload)
    return b"HPUB %b %d %d\r\n%b%b\r\n" % (subject.encode(), len(head), size, head, payload)


def header_value(value: str) -> str:
    """``value`` as nats-py writes a header value (stripped, line breaks made spaces)."""
    return value.strip().translate(_NEWLINES)


def batch_ack(msg: Msg) -> tuple[int, int] | dict[str, Any]:
    """An atomic batch's commit reply: (the last message's stream sequence, how many were
    stored: the batch's sequences run up to it), or the server's error (nothing stored)."""
    if not msg.data:
        raise BrokerUnavailableError(f"no JetStream answer for {msg.subject}: {msg.headers}")
    reply = json.loads(msg.data)
    error = reply.get("error")
    if error is not None:
        return dict(error)
    return int(reply["seq"]), int(reply["count"])


def status(msg: Msg) -> str | None:
    headers = msg.headers
    return None if not headers else headers.get("Status")


async def connect(
    config: NatsConfig,
    *,
    name: str,
    disconnected: Callable[[], Awaitable[None]] | None = None,
    reconnected: Callable[[], Awaitable[None]] | None = None,
    denied: Callable[[str], None] | None = None,
) -> Client:
    """A connection that reconnects for ever once it is up (calls time out meanwhile); the
    first connect gives up after ``unavailable_after_s``, closing what it opened.
    ``disconnected`` is called each time the connection is lost, ``reconnected`` each time
    it is back; ``denied`` with the server's message each time it refuses a subject to the
    URL's user (a permissions violation: the server answers nothing else, so the request
    would only time out)."""
    wait_s = 0.2
    nc = Client()
    tls = tls_options(config)
    connecting = True

    async def on_error(exc: Exception) -> None:
        # nats-py retries the first connect on any error, a refusal too: stop at one that no
        # retry fixes (raised from here, it ends nats-py's connect)
        refused = _refusal(exc) if connecting else None
        if refused is not None:
            raise BrokerError(f"NATS at {config.where} {refused}", permanent=True) from exc
        if denied is not None and "permissions violation" in str(exc).lower():
            denied(str(exc))
        await _log_error(exc)

    try:
        await nc.connect(
            servers=config.servers,
            **tls,
            name=name,
            connect_timeout=min(2.0, config.unavailable_after_s),  # type: ignore[arg-type]
            allow_reconnect=True,
            # nats-py retries the first connect this many times per server too: bounded here
            max_reconnect_attempts=max(1, int(config.unavailable_after_s / wait_s)),
            reconnect_time_wait=wait_s,  # type: ignore[arg-type]  # seconds: floats work
            ping_interval=5,
            max_outstanding_pings=3,
            pending_size=64 * 1024 * 1024,
            error_cb=on_error,
            disconnected_cb=disconnected or _quiet,
            reconnected_cb=reconnected or _quiet,
            closed_cb=_quiet,
        )
        if config.tls and not (nc._server_info or {}).get("tls_required"):
            # nats-py upgrades to TLS only when the server asks: a server (or a man in the
            # middle) that does not would be spoken to in clear
            raise BrokerError(
                f"NATS at {config.where} does not require TLS, and the URL asks for it: "
                "configure a tls block on the server (or drop the URL's tls options)",
                permanent=True,
            )
    except BaseException as exc:
        _abort(nc)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 2.0)
        if not isinstance(exc, Exception) or isinstance(exc, BrokerError):
            raise
        refused = _refusal(exc)
        if refused is not None:
            raise BrokerError(f"NATS at {config.where} {refused}", permanent=True) from exc
        raise BrokerUnavailableError(
            f"NATS at {config.where} could not be reached ({type(exc).__name__}: {exc})"
        ) from exc
    connecting = False
    nc.options["max_reconnect_attempts"] = -1  # up once: never give up on a server again
    return nc


def _abort(nc: Client) -> None:
    """Close the sockets of a connect that failed. After a failed TLS handshake nats-py's
    own close waits for ever (on the stream it wrapped), so its socket would be left open."""
    transport = getattr(nc, "_transport", None)
    for name in ("_io_writer", "_bare_io_writer"):
        writer = getattr(transport, name, None)
        if writer is not None:
            writer.transport.abort()


def tls_options(config: NatsConfig) -> dict[str, Any]:
    """nats-py's ``tls`` (and ``tls_hostname``) options for the URL's ``tls_*`` ones."""
    if not config.tls:
        return {}
    try:
        context = ssl.create_default_context(cafile=config.tls_ca)
        if config.tls_cert is not None:
            context.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"NATS TLS files of the URL cannot be used: {exc}") from None
    options: dict[str, Any] = {"tls": context}
    if config.tls_hostname is not None:
        options["tls_hostname"] = config.tls_hostname
    return options


def _refusal(exc: BaseException) -> str | None:
    """Why the server refused us for good (no retry helps), from the connect's error chain:
    a certificate that does not verify, or credentials it does not take."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return f"refused: its TLS certificate does not verify ({seen.verify_message})"
        if isinstance(seen, ssl.SSLError) and "CERTIFICATE_REQUIRED" in str(seen):
            return "refused the connection: it requires a TLS client certificate (tls_cert)"
        if isinstance(seen, ssl.SSLError) and "ALERT_BAD_CERTIFICATE" in str(seen):
            return f"refused the TLS client certificate ({seen})"
        # (not "Authentication Timeout": a slow client, which a retry may fix)
        if "authorization violation" in str(seen).lower():
            return f"refused the connection's credentials ({seen})"
        seen = seen.__cause__ or seen.__context__
    return None


async def _log_error(exc: Exception) -> None:
    log.debug("nats: %s", exc)


async def _quiet() -> None:
    return None


def bucket_stream(bucket: str) -> str:
    return f"KV_{bucket}"


def stream_configs(
    config: NatsConfig, *, schedules: bool, atomic: bool = False
) -> list[StreamConfig]:
    """Every stream the broker uses, with explicit settings (never the server's defaults).
    ``atomic``: the dispatch stream and the jobs bucket take atomic batches (a bulk send)."""
    storage = StorageType.FILE if config.storage == "file" else StorageType.MEMORY
    dispatch = StreamConfig(
        name=config.dispatch_stream,
        description="taskmill: which job to run next (pointers to the jobs bucket)",
        subjects=[f"{config.prefix}.d.>", f"{config.prefix}.s.>", f"{config.prefix}.t.>"],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=storage,
        num_replicas=config.replicas,
        discard=DiscardPolicy.NEW,
        max_msgs=-1,
        max_bytes=-1,
        max_age=0,
        duplicate_window=120.0,
        allow_direct=True,
        allow_msg_schedules=True if schedules else None,
        allow_atomic=True if atomic else None,
    )
    configs = [dispatch]
    for what in BUCKETS:
        bucket = config.bucket(what)
        configs.append(
            StreamConfig(
                name=bucket_stream(bucket),
                description=f"taskmill: {what}",
                subjects=[f"$KV.{bucket}.>"],
                retention=RetentionPolicy.LIMITS,
                storage=storage,
                num_replicas=config.replicas,
                discard=DiscardPolicy.NEW,
                max_msgs_per_subject=1,
                max_msgs=-1,
                max_bytes=-1,
                max_age=0,
                duplicate_window=120.0,
                allow_direct=True,
                allow_rollup_hdrs=True,
                deny_delete=False,
                deny_purge=False,
                allow_atomic=True if atomic and what in ATOMIC_STREAMS else None,
            )
        )
    return configs


async def ensure_streams(
    nc: Client, config: NatsConfig, *, schedules: bool, atomic: bool = False
) -> list[StreamConfig]:
    """Create what is missing and warn about storage that loses acknowledged jobs. An
    existing stream is left as it is, but for ``allow_atomic`` (``atomic``), turned on where a
    stream made before it lacks it: a setting the server lets change, which only lets bulk
    sends be atomic batches (a server that refuses: they are sent message by message).
    Returns the configurations as the server has them."""
    js = nc.jetstream()
    found: list[StreamConfig] = []
    for wanted in stream_configs(config, schedules=schedules, atomic=atomic):
        try:
            info = await js.stream_info(wanted.name or "")
        except NotFoundError:
            info = await js.add_stream(wanted)
        if wanted.allow_atomic and not info.config.allow_atomic:
            info.config.allow_atomic = True
            try:
                info = await js.update_stream(info.config)
            except Exception as exc:  # an optimisation refused: go without it
                log.info("NATS stream %s keeps atomic batches off: %s", wanted.name, exc)
                info.config.allow_atomic = False
        found.append(info.config)
    _warn_about(found, config)
    return found


def atomic_batches(found: Sequence[StreamConfig], config: NatsConfig) -> bool:
    """Whether bulk sends may be atomic batches: both streams they write allow them."""
    names = {config.dispatch_stream, bucket_stream(config.bucket("jobs"))}
    return all(bool(c.allow_atomic) for c in found if c.name in names)


def _warn_about(found: list[StreamConfig], config: NatsConfig) -> None:
    memory = [c.name for c in found if c.storage == StorageType.MEMORY]
    if memory:
        log.warning(
            "NATS streams %s keep jobs in memory: a server restart loses every job in them",
            ", ".join(str(n) for n in memory),
        )
    single = [c.name for c in found if (c.num_replicas or 1) < 2]
    if single and len(config.servers) > 1:
        log.warning(
            "NATS streams %s have one replica though %d servers are named: a node that "
            "fails takes its jobs with it until it is back (use ?replicas=3)",
            ", ".join(str(n) for n in single),
            len(config.servers),
        )


def server_has_schedules(nc: Client) -> bool:
    """Scheduled messages (and atomic batches) came with nats-server 2.12."""
    version = str(nc._server_info.get("version", "0.0.0"))
    try:
        major, minor = (int(p) for p in version.split("-")[0].split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (2, 12)


def headers_of(pairs: Mapping[str, str] | None) -> dict[str, str] | None:
    return None if not pairs else dict(pairs)
