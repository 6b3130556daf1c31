"""The NATS broker's plumbing: a connection per event loop, key-value reads and
compare-and-set writes on the buckets, and reading a whole bucket.

Like the Redis broker, a worker attaches its loop and gets a connection of its own; every other
caller (a producer's ``send()``, a test, the dashboard) runs on the broker's I/O loop.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import threading
import time
import uuid
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError, NoServersError, OutboundBufferLimitError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext
from nats.js.errors import ServiceUnavailableError

from taskmill.brokers.nats.config import NatsConfig, parse_url
from taskmill.brokers.nats.connection import (
    CasError,
    Requests,
    ack_seq,
    atomic_batches,
    bucket_stream,
    connect,
    ensure_streams,
    server_has_schedules,
    status,
)
from taskmill.errors import BrokerError, BrokerUnavailableError
from taskmill.portal import Portal
from taskmill.urls import scrub

T = TypeVar("T")
SCAN_BATCH = 256
"""Records a scan of a bucket holds at once (``_scan_messages``), at most."""
SCAN_BYTES = 4 * 1024 * 1024
"""About how many bytes of records a scan holds at once: its batches shrink to this for large
records (256 records of 200 KB would be 51 MB), and its first batch is small to learn
their size."""
_SCAN_FIRST_BATCH = 16
_SCAN_IDLE_S = 30.0
_SCAN_QUIET_S = 1.0
"""A scan's fetch that finds nothing this long checks whether the scan is over."""
_SCAN_TRIES = 3

_UNAVAILABLE = (
    TimeoutError,
    ConnectionClosedError,
    NoServersError,
    OutboundBufferLimitError,
    BrokerUnavailableError,
)


@dataclass
class Session:
    """One event loop's connection and what hangs on it."""

    nc: Client
    requests: Requests
    lanes: dict[str, Any] = field(default_factory=dict)
    """consumer name -> ``dispatch.Lane`` (the pullers of this loop)."""
    wake_version: int = 0
    seen_version: int = 0
    woken: asyncio.Event = field(default_factory=asyncio.Event)
    """Set by a wake-up (``NatsConfig.wake_subject``), which every wait heeds."""
    wake_sub: Any = None
    ready_version: int = 0
    seen_ready: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    """Set by a job made ready (``NatsConfig.ready_subject``), which only waits that hold no
    long pull heed; subscribed to at the first such wait (``ready_sub``)."""
    ready_sub: Any = None


@dataclass(frozen=True, slots=True)
class Entry:
    """A KV value and its revision (the stream sequence that wrote it)."""

    revision: int
    value: bytes
    deleted: bool = False
    stored_at: float = 0.0


class Store:
    """Sessions, KV operations and bucket scans; ``NatsBroker`` is made on top."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.config: NatsConfig = parse_url(url)
        self._io: Portal | None = None
        self._io_lock = threading.Lock()
        self._sessions: dict[asyncio.AbstractEventLoop, Session] = {}
        self._denied: BrokerError | None = None
        """A permissions violation the server reported, until a failed call reports it."""
        self._opening: dict[asyncio.AbstractEventLoop, asyncio.Future[Session]] = {}
        self._attached: set[asyncio.AbstractEventLoop] = set()
        self._detached: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
        self._ready = False
        self.schedules_on_server = False
        self.atomic_batches = False
        """Whether a bulk send writes atomic batches (nats-server 2.12, ``_store_batched``)."""

    # --- loops and sessions ---------------------------------------------------------------

    def _io_loop(self) -> asyncio.AbstractEventLoop:
        io = self._io
        if io is None:
            with self._io_lock:
                if self._io is None:
                    self._io = Portal(name="taskmill-nats-io")
                io = self._io
        return io.loop

    async def _session(self) -> Session:
        loop = asyncio.get_running_loop()
        session = self._sessions.get(loop)
        if session is not None:
            return session
        if loop in self._detached:
            raise BrokerUnavailableError(
                "the worker detached from this event loop: no new NATS connection is made here"
            )
        if loop not in self._attached and loop is not self._io_loop():
            # a connection here would outlive the loop unclosed: public methods hop to the
            # I/O loop (``on_io_loop``); this is a call that skipped them
            raise RuntimeError("the NATS broker's connections live on its I/O loop or a worker's")
        opening = self._opening.get(loop)
        if opening is None:
            opening = self._opening[loop] = loop.create_future()
            try:
                session = await self._new_session()
            except BaseException as exc:
                del self._opening[loop]
                opening.set_exception(exc)
                opening.exception()  # retrieved: the caller raises it
                raise
            del self._opening[loop]
            self._sessions[loop] = session
            opening.set_result(session)
            return session
        return await opening

    async def _new_session(self) -> Session:
        opened: list[Requests] = []
        sessions: list[Session] = []

        async def disconnected() -> None:
            self._server_state_in_doubt()
            # a reply not received yet never comes (it was for the lost connection): fail its
            # request now, and its caller retries once reconnected, instead of waiting out
            # the request's timeout (5 s of a worker doing nothing after a server restart)
            for requests in opened:
                requests.fail_all(
                    BrokerUnavailableError(
                        "the NATS connection was lost before the reply (a write under way may "
                        "still have been applied)"
                    )
                )

        async def reconnected() -> None:
            for session in sessions:
                self._reconnected(session)

        def denied(message: str) -> None:
            # the server refused a subject to this user and will answer nothing: the call
            # waiting for that answer times out, and _retrying then says why
            self._denied = self._permission_refusal(message)

        nc = await connect(
            self.config,
            name=f"taskmill {self.config.prefix}",
            disconnected=disconnected,
            reconnected=reconnected,
            denied=denied,
        )
        try:
            requests = Requests(nc)
            opened.append(requests)
            await requests.start()
            session = Session(nc=nc, requests=requests)
            sessions.append(session)
            if not self._ready:
                self.schedules_on_server = self.config.schedules == "server" or (
                    self.config.schedules == "auto" and server_has_schedules(nc)
                )
                if self.config.schedules == "server" and not server_has_schedules(nc):
                    raise BrokerError(
                        f"schedules=server needs nats-server 2.12 or later; "
                        f"{self.config.where} runs {nc._server_info.get('version')}",
                        permanent=True,
                    )
                await self._ensure_streams(nc)
                await self._retrying(lambda: self._mark_epoch(session))
                self._ready = True
            await self._session_opened(session)
        except BaseException:
            # the session is not kept: its connection would be left open (a refused stream
            # set-up, retried by each call, opened one more every time)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), 2.0)
            raise
        return session

    async def _ensure_streams(self, nc: Client) -> None:
        atomic = server_has_schedules(nc)  # atomic batches came with scheduled messages (2.12)
        found = await self._retrying(
            lambda: ensure_streams(
                nc, self.config, schedules=self.schedules_on_server, atomic=atomic
            )
        )
        self.atomic_batches = atomic_batches(found, self.config)

    async def _mark_epoch(self, session: Session) -> None:
        """Write the store's epoch marker if there is none (``Broker.epoch``)."""
        subject = self._subject("misc", "epoch")
        headers = {"Nats-Expected-Last-Subject-Sequence": "0"}
        msg = await session.requests.request(subject, uuid.uuid4().hex.encode(), headers)
        with contextlib.suppress(CasError):
            ack_seq(msg)

    async def read_epoch(self, *, mark: bool) -> str | None:
        """``Broker.epoch`` on this store: streams deleted or wiped with the server's store are
        made again (empty) when ``mark`` is given, as at the first open."""
        session = await self._retrying(self._session)
        if mark:
            await self._ensure_streams(session.nc)
            await self._retrying(lambda: self._mark_epoch(session))
        try:
            entry = await self._retrying(lambda: self._get("misc", "epoch"))
        except BrokerError as exc:
            if "503" in str(exc):  # no stream answers the direct get: it is gone
                return None
            raise
        return None if entry is None or entry.deleted else entry.value.decode()

    async def _session_opened(self, session: Session) -> None:
        """Subscriptions a session needs (the broker adds its wake-up subscription)."""

    def _reconnected(self, session: Session) -> None:
        """``session``'s connection is back after a loss (the broker renews its long pulls)."""

    def _server_state_in_doubt(self) -> None:
        """The connection was lost: the server may come back without what this process
        made there (a store wiped, T4), so what it remembers of that is forgotten."""

    async def _close_session(self, loop: asyncio.AbstractEventLoop) -> None:
        session = self._sessions.pop(loop, None)
        if session is None:
            return
        session.requests.fail_all(BrokerUnavailableError("the NATS connection was closed"))
        # pointers a wait took or a claim kept, never claimed: back to the others now, each
        # lane's even if another's failed, and flushed before the connection closes
        for lane in session.lanes.values():
            with contextlib.suppress(Exception):
                await lane.close()
        with contextlib.suppress(Exception):
            await session.nc.flush(timeout=2)
        with contextlib.suppress(Exception):
            await session.nc.close()

    # --- errors and retries ---------------------------------------------------------------

    def _unavailable(self, exc: BaseException) -> BrokerUnavailableError:
        message = (
            f"NATS at {self.config.where} did not answer within "
            f"{self.config.unavailable_after_s:g} s ({type(exc).__name__}: {exc}). A write "
            "that was under way may still have been applied; sending the same job again is "
            "safe (its id is checked)"
        )
        return BrokerUnavailableError(scrub(message, self.url))

    def _permission_refusal(self, message: str) -> BrokerError:
        text = (
            f"NATS at {self.config.where} refused this URL's user: {message}. Its permissions "
            f"must allow the subjects of the prefix {self.config.prefix!r} (docs/brokers.md, "
            "several tenants on one server)"
        )
        return BrokerError(scrub(text, self.url), permanent=True)

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        deadline = time.monotonic() + self.config.unavailable_after_s
        delay = 0.05
        while True:
            try:
                async with asyncio.timeout(max(0.01, deadline - time.monotonic())):
                    return await call()
            except _UNAVAILABLE as exc:
                refusal, self._denied = self._denied, None
                if refusal is not None:  # no answer because the server refused the subject
                    raise refusal from exc
                if time.monotonic() + delay > deadline:
                    raise self._unavailable(exc) from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    # --- key-value ------------------------------------------------------------------------

    def _subject(self, what: str, key: str) -> str:
        return f"$KV.{self.config.bucket(what)}.{key}"

    async def _get_many(
        self, what: str, keys: Sequence[str], *, leader: bool = False
    ) -> list[Entry | None]:
        """The last value of each key, asked together (one round trip). A direct get, which
        any replica of a clustered bucket may answer, possibly from before a write it has not
        yet received; ``leader=True`` asks the stream's leader, which has every acknowledged
        write: for a decision that must not rest on an old value (a finish refused)."""
        if not keys:
            return []
        session = await self._session()
        stream = bucket_stream(self.config.bucket(what))
        futures = []
        for key in keys:
            subject = self._subject(what, key)
            if leader:
                body = json.dumps({"last_by_subj": subject}).encode()
                futures.append(
                    await session.requests.send(f"$JS.API.STREAM.MSG.GET.{stream}", body)
                )
            else:
                futures.append(
                    await session.requests.send(f"$JS.API.DIRECT.GET.{stream}.{subject}", b"")
                )
        replies = await session.requests.replies(futures)
        return [_leader_entry(msg) if leader else _entry(msg) for msg in replies]

    async def _get(self, what: str, key: str) -> Entry | None:
        return (await self._get_many(what, [key]))[0]

    async def _put_many(
        self, what: str, writes: Sequence[tuple[str, bytes, int | None]]
    ) -> list[int | CasError]:
        """Writes ``(key, value, expected revision)`` (None: no check; 0: the key must not
        exist) together; each gives its new revision or the ``CasError`` of a lost CAS."""
        if not writes:
            return []
        session = await self._session()
        futures = await self._send_puts(what, writes)
        return [put_result(msg) for msg in await session.requests.replies(futures)]

    async def _send_puts(
        self, what: str, writes: Sequence[tuple[str, bytes, int | None]]
    ) -> list[asyncio.Future[Msg]]:
        """``_put_many``'s writes sent, their replies not awaited (``put_result`` reads one)."""
        session = await self._session()
        futures = []
        for key, value, last in writes:
            headers = None if last is None else {"Nats-Expected-Last-Subject-Sequence": str(last)}
            futures.append(await session.requests.send(self._subject(what, key), value, headers))
        return futures

    async def _put(self, what: str, key: str, value: bytes, last: int | None = None) -> int:
        result = (await self._put_many(what, [(key, value, last)]))[0]
        if isinstance(result, CasError):
            raise result
        return result

    async def _delete(self, what: str, key: str, last: int | None = None) -> bool:
        """A delete marker (CAS on ``last`` if given); False if the CAS lost."""
        session = await self._session()
        headers = {"KV-Operation": "DEL"}
        if last is not None:
            headers["Nats-Expected-Last-Subject-Sequence"] = str(last)
        msg = await session.requests.request(self._subject(what, key), b"", headers)
        try:
            ack_seq(msg)
        except CasError:
            return False
        return True

    async def _erase(self, what: str, revisions: Sequence[int]) -> int:
        """Remove stored messages by revision (no marker is left). How many were there."""
        session = await self._session()
        stream = bucket_stream(self.config.bucket(what))
        futures = [
            await session.requests.send(
                f"$JS.API.STREAM.MSG.DELETE.{stream}",
                json.dumps({"seq": rev, "no_erase": True}).encode(),
            )
            for rev in revisions
        ]
        replies = await session.requests.replies(futures)
        return sum(1 for msg in replies if json.loads(msg.data or b"{}").get("success"))

    async def _keys(self, what: str, pattern: str = ">") -> list[str]:
        """The keys of a bucket with a value or a marker (one stream info request)."""
        bucket = self.config.bucket(what)
        prefix = f"$KV.{bucket}."
        subjects = await self._subjects(bucket_stream(bucket), prefix + pattern)
        return [s[len(prefix) :] for s in subjects]

    async def _subjects(self, stream: str, pattern: str) -> list[str]:
        """The subjects of ``stream`` matching ``pattern`` that hold messages."""
        session = await self._session()
        found: list[str] = []
        offset = 0
        while True:
            msg = await session.requests.request(
                f"$JS.API.STREAM.INFO.{stream}",
                json.dumps({"subjects_filter": pattern, "offset": offset}).encode(),
            )
            info = json.loads(msg.data)
            if "error" in info:
                raise BrokerError(f"NATS refused stream info: {info['error']}")
            subjects = info.get("state", {}).get("subjects") or {}
            found.extend(subjects)
            offset += len(subjects)
            if not subjects or offset >= int(info.get("total", 0) or 0):
                return found

    async def _next_message(self, stream: str, subject: str, seq: int) -> tuple[int, Msg] | None:
        """The first message on ``subject`` at or after ``seq`` (a direct get), with its
        sequence; None when there is none."""
        session = await self._session()
        body = json.dumps({"next_by_subj": subject, "seq": seq}).encode()
        msg = await session.requests.request(f"$JS.API.DIRECT.GET.{stream}", body)
        if status(msg) is not None:
            if status(msg) == "404":
                return None
            raise BrokerUnavailableError(f"NATS direct get failed: {msg.headers}")
        return int((msg.headers or {}).get("Nats-Sequence", 0)), msg

    async def _scan(self, what: str) -> AsyncIterator[tuple[str, Entry]]:
        """Every key of a bucket with its last value (markers included), in no order, each key
        once: a key written while the scan runs is delivered again (the consumer goes on with
        new messages), so the scan is read whole and the latest revision of each key kept."""
        latest: dict[str, Entry] = {}
        async for key, entry in self._scan_messages(what):
            latest[key] = entry  # the stream delivers in order: a later one is newer
        for key, entry in latest.items():
            yield key, entry

    async def _scan_kept(
        self,
        what: str,
        keep: Callable[[str, Entry], T | None],
        *,
        limit: int | None = None,
        stored_before: float | None = None,
    ) -> dict[str, T]:
        """What ``keep`` makes of each key's latest message, by key; None keeps nothing.
        Messages are judged as the scan brings them, so the bucket is never held whole; a key
        written while the scan runs comes again, and its newer message decides. Stops once
        ``limit`` keys are kept, and at the first message stored at or after
        ``stored_before`` (server time): the scan brings the keys' last messages in the order
        they were stored, so every one after it is newer too."""
        kept: dict[str, T] = {}
        async with contextlib.aclosing(self._scan_messages(what)) as scan:
            async for key, entry in scan:
                if stored_before is not None and entry.stored_at >= stored_before:
                    break
                value = keep(key, entry)
                if value is None:
                    kept.pop(key, None)
                    continue
                kept[key] = value
                if limit is not None and len(kept) >= limit:
                    break
        return kept

    async def _scan_messages(self, what: str) -> AsyncGenerator[tuple[str, Entry], None]:
        """The last message of each key of a bucket, then whatever is written meanwhile.

        Read in batches of ``SCAN_BATCH`` from a pull consumer of its own: a push consumer
        sends as fast as the server can, and what the reader had not taken yet waited in
        this process (a sweep over 8,000 records held 6.6 MiB at its peak, over 2,000 2.7:
        the process's memory followed the jobs stored, T20); pulled, it is one batch.
        A consumer lost on the way (a cluster node gone: 503) is made again and the scan
        starts over, up to ``_SCAN_TRIES`` times: a key comes again, and every caller keeps
        the latest revision of a key."""
        session = await self._session()
        bucket = self.config.bucket(what)
        stream = bucket_stream(bucket)
        js = session.nc.jetstream()
        info = await js.stream_info(stream)
        if not info.state.messages:
            return
        for attempt in range(1, _SCAN_TRIES + 1):
            try:
                async for key, entry in self._scan_pass(js, bucket):
                    yield key, entry
                return
            except ServiceUnavailableError as exc:
                if attempt == _SCAN_TRIES:
                    raise BrokerUnavailableError(
                        f"reading the {what} bucket on {self.config.where} failed "
                        f"{_SCAN_TRIES} times: its consumer was lost ({exc})"
                    ) from exc
                await asyncio.sleep(0.1 * attempt)

    async def _scan_fetch(
        self, js: JetStreamContext, sub: Any, stream: str, consumer: str, batch: int
    ) -> list[Msg] | None:
        """The scan's next batch, or None when it is over. A message the consumer counted as
        pending can be replaced by a newer revision of its key before it is delivered, and
        then never comes (a CI run waited out the whole timeout while jobs were being
        cancelled): a fetch that finds nothing for a second ends the scan once the consumer
        has been given the stream's last message, and waits on, up to
        ``unavailable_after_s``, otherwise."""
        deadline = time.monotonic() + self.config.unavailable_after_s
        while True:
            wait = max(0.01, min(_SCAN_QUIET_S, deadline - time.monotonic()))
            try:
                msgs: list[Msg] = await sub.fetch(batch, timeout=wait)
                return msgs
            except NatsTimeoutError:
                if await _caught_up(js, stream, consumer):
                    return None
                if time.monotonic() >= deadline:
                    raise

    async def _scan_pass(
        self, js: JetStreamContext, bucket: str
    ) -> AsyncIterator[tuple[str, Entry]]:
        stream = bucket_stream(bucket)
        prefix = f"$KV.{bucket}."
        consumer = await js.add_consumer(
            stream,
            ConsumerConfig(
                deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
                ack_policy=AckPolicy.NONE,
                filter_subject=prefix + ">",
                inactive_threshold=_SCAN_IDLE_S,  # gone by itself if this process dies
                mem_storage=True,
                max_waiting=1,
            ),
        )
        sub = await js.pull_subscribe_bind(consumer=consumer.name, stream=stream)
        batch = _SCAN_FIRST_BATCH
        try:
            while True:
                msgs = await self._scan_fetch(js, sub, stream, consumer.name, batch)
                if msgs is None:
                    return
                size = sum(len(msg.data) for msg in msgs)
                batch = max(1, min(SCAN_BATCH, SCAN_BYTES * len(msgs) // max(size, 1)))
                for msg in msgs:
                    meta = msg.metadata
                    deleted = bool(msg.headers and msg.headers.get("KV-Operation"))
                    stored = meta.timestamp.timestamp() if meta.timestamp else 0.0
                    entry = Entry(meta.sequence.stream, msg.data, deleted, stored)
                    yield msg.subject[len(prefix) :], entry
                    if not meta.num_pending:
                        return
                msgs.clear()  # not held while the next batch arrives
        finally:
            await sub.unsubscribe()
            with contextlib.suppress(Exception):  # else it goes after _SCAN_IDLE_S
                await js.delete_consumer(stream, consumer.name)


async def _caught_up(js: JetStreamContext, stream: str, consumer: str) -> bool:
    """Whether ``consumer`` was delivered the stream's last message."""
    delivered: int = (await js.consumer_info(stream, consumer)).delivered.stream_seq or 0
    last: int = (await js.stream_info(stream)).state.last_seq or 0
    return delivered >= last


def put_result(msg: Msg) -> int | CasError:
    """The new revision a write's reply gives, or the ``CasError`` of a lost CAS."""
    try:
        return ack_seq(msg)
    except CasError as exc:
        return exc


def _entry(msg: Msg) -> Entry | None:
    code = status(msg)
    if code is not None:
        if code == "404":
            return None
        raise BrokerError(f"NATS direct get failed: {code} {msg.headers}")
    headers = msg.headers or {}
    revision = int(headers.get("Nats-Sequence", 0))
    deleted = headers.get("KV-Operation") in ("DEL", "PURGE")
    return Entry(revision, msg.data, deleted, _stamp(headers.get("Nats-Time-Stamp")))


_NO_MESSAGE = 10037


def _leader_entry(msg: Msg) -> Entry | None:
    reply = json.loads(msg.data or b"{}")
    error = reply.get("error")
    if error is not None:
        if error.get("err_code") == _NO_MESSAGE:
            return None
        # a stream between leaders answers errors of its own: ask again later, never "absent"
        raise BrokerUnavailableError(f"NATS could not read: {error.get('description', error)}")
    if not msg.data:
        raise BrokerUnavailableError(f"no JetStream answer to a read: {msg.headers}")
    message = reply["message"]
    raw_headers = base64.b64decode(message.get("hdrs") or b"")
    deleted = b"KV-Operation: DEL" in raw_headers or b"KV-Operation: PURGE" in raw_headers
    data = base64.b64decode(message.get("data") or b"")
    return Entry(int(message["seq"]), data, deleted, _stamp(message.get("time")))


def _stamp(raw: str | None) -> float:
    """An RFC 3339 time with nanoseconds, as Unix seconds (0.0 if absent)."""
    if not raw:
        return 0.0
    from datetime import datetime

    text = raw.rstrip("Z")
    whole, _, fraction = text.partition(".")
    base = datetime.fromisoformat(whole + "+00:00").timestamp()
    return base + (float("0." + fraction) if fraction else 0.0)
