"""The Redis broker: ``App("redis://host:6379/0")`` (also ``rediss://``, and Valkey).

Every state change is one Lua script (``lua/*.lua``), run by EVALSHA and reloaded on NOSCRIPT,
so each is atomic and costs one round trip; times inside them come from the server's ``TIME``.
Layout under the key prefix (default ``taskmill:``):

- ``job:{id}``: a hash per job; it expires ``result_ttl_s`` after the job finishes;
- ``q:{queue}:ready``: a sorted set, score ``-priority``, members ordered by run_at then
  enqueue order (``{run_at ms}:{seq}:{id}``), popped by the claim script;
- ``q:{queue}:scheduled``: delayed jobs by run_at, moved to ready by the claim script;
- ``q:{queue}:running`` and ``running`` (by lease expiry, for recovery);
- ``q:{queue}:{succeeded|failed|cancelled}``: finished jobs by finish time (pruned by workers);
- ``jobs``: every job by the order it was stored (score: a counter, ``seq``), for listings;
  ``layout``: 2 once jobs stored before that index existed were added to it;
- ``key:{key}``: the pending job holding a unique key; ``paused``, ``queues``;
- ``epoch``: a random id set when the store is first opened; workers that find it gone or
  changed report that Redis came back empty (``Broker.epoch``);
- ``q:{queue}:wake``: a short list of wake tokens; an idle worker ``BLPOP``s the lists of its
  queues, so one token wakes one worker, and a token pushed between a worker's empty claim and
  its wait is still there when it waits; ``idle`` marks that some worker recently found no work
  (enqueues push tokens only then);
- ``q:{queue}:idlers``, ``w:{id}:idle|inbox|handed``: hand-overs (``lua/_common.lua``): an
  enqueue claims a job for a worker that registered before blocking and pushes it onto the
  worker's inbox, which its BLPOP watches, so the job starts without a claim round trip;
- ``workers`` and ``worker:{id}``: the registry, with a TTL.

redis-py's asyncio connections belong to the event loop that made them, while one broker serves
several loops (the app's portal thread, workers, a user's ``asyncio.run``). So the broker runs
its own I/O loop on a thread and every method runs there: connections never outlive the loop
they belong to, and ``close()`` closes all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import threading
import time
import uuid
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from importlib import resources
from typing import Any, ParamSpec, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import msgspec
import redis
import redis.asyncio as aredis
from hiredis import pack_command
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    InvalidResponse,
    NoPermissionError,
    NoScriptError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from taskmill.brokers._io import on_io_loop
from taskmill.brokers._rows import (
    RECOVERED_ERROR_TYPE,
    RECOVERED_MESSAGE,
    RETRY,
    decode_error,
    flatten_outcomes,
    unreadable_record,
)
from taskmill.brokers.base import (
    Broker,
    Capabilities,
    EnqueueResult,
    HandOver,
    HeartbeatReply,
    JobPage,
    JobQuery,
    OnConflict,
    decode_cursor,
    encode_cursor,
)
from taskmill.brokers.features import (
    EventBus,
    LimitStore,
    ScheduleStore,
    Subscription,
    WorkflowRecord,
    WorkflowStore,
)
from taskmill.errors import (
    BrokerError,
    BrokerUnavailableError,
    ConfigurationError,
    DuplicateJobError,
)
from taskmill.job import (
    Claim,
    Failed,
    Finish,
    Job,
    JobState,
    NewJob,
    Progress,
    QueueStats,
    WorkerInfo,
)
from taskmill.meta import decode_meta, encode_meta, meta_matches
from taskmill.portal import Portal
from taskmill.settings import Settings
from taskmill.urls import redact_url, scrub, url_secrets

log = logging.getLogger("taskmill.brokers.redis")
T = TypeVar("T")
P = ParamSpec("P")

_OWN_OPTIONS = {"prefix", "unavailable_after_s"}
_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)
# a server that answered, but not as a Redis that takes this URL (checked before _UNAVAILABLE:
# redis-py's authentication errors are ConnectionErrors, yet no retry fixes a wrong password)
_MISCONFIGURED = (InvalidResponse, AuthenticationError, AuthorizationError, ResponseError)
# what redis-py's ConnectionError says when the TLS handshake failed for good
_TLS_REFUSALS = ("CERTIFICATE_VERIFY_FAILED", "WRONG_VERSION_NUMBER", "certificate verify failed")
# what Redis says when the URL's user's ACL does not allow a key, channel or command: a plain
# command's NOPERM (redis-py drops the word), or a command a script ran
_ACL_REFUSALS = (
    "NOPERM",
    "no permissions to",
    "executing the script can't",
)
_MAX_BLOCK_S = 60.0  # a wait longer than this returns early (spurious returns are allowed)
_encoder = msgspec.json.Encoder()
_FINISHED = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)
_LAYOUT = 2
"""Version of the key layout: 2 added the ``jobs`` index."""
_PRIORITY_STEP = 2**40
_READY_EPOCH_MS = 1735689600000
"""The terms of a ready job's score (``ready_score`` in ``lua/_common.lua``)."""
COUNT_SCAN_MAX = 1_000
"""A listing's total with a task or meta filter reads at most this many jobs' fields; past
that it is an estimate (``JobPage.total_estimated``)."""
_NARROW_MAX = 10_000
"""A listing filtered by state or queue whose indexes hold at most this many jobs reads them
all and sorts them; a wider one walks the ``jobs`` index and reads each job's filter fields."""


def _load_scripts() -> dict[str, str]:
    lua = resources.files("taskmill.brokers").joinpath("lua")
    common = lua.joinpath("_common.lua").read_text("utf-8")
    finishes = lua.joinpath("_finishes.lua").read_text("utf-8")
    scripts = {}
    for name in ("enqueue", "claim", "finish", "heartbeat", "progress", "recover", "cancel",
                 "retry", "purge", "prune", "idle", "unregister", "save_workflow", "end_workflow",
                 "reopen_workflow", "rate_slot", "slot", "run_now", "delete"):  # fmt: skip
        body = lua.joinpath(f"{name}.lua").read_text("utf-8")
        prelude = common + (finishes if name in ("claim", "finish") else "")
        scripts[name] = prelude + "\n" + body
    return scripts


SCRIPTS = _load_scripts()
SHAS = {name: hashlib.sha1(src.encode()).hexdigest() for name, src in SCRIPTS.items()}


def parse_url(url: str) -> tuple[str, str, float]:
    """(redis-py URL, key prefix, seconds a producer waits for an unreachable server)."""
    shown = redact_url(url)  # for messages: never the password
    parts = urlsplit(url)
    scheme = {"valkey": "redis", "valkeys": "rediss"}.get(parts.scheme, parts.scheme)
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    prefix = options.pop("prefix", "taskmill:")
    if not prefix:
        raise ConfigurationError(f"empty prefix in {shown!r}")
    database = parts.path.lstrip("/")
    if database and not database.isdigit():  # redis-py would take database 0 without a word
        raise ConfigurationError(
            f"the path of {shown!r} must be a database number, as in redis://host:6379/0, "
            f"not {database!r}"
        )
    try:
        unavailable_after_s = float(options.pop("unavailable_after_s", "5"))
    except ValueError:
        raise ConfigurationError(f"unavailable_after_s in {shown!r} must be a number") from None
    query = urlencode(options)
    return urlunsplit((scheme, parts.netloc, parts.path, query, "")), prefix, unavailable_after_s


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


def _num(value: bytes | None) -> float | None:
    return None if value is None or value == b"" else float(value)


def _job(fields: Sequence[bytes] | dict[bytes, bytes]) -> Job:
    """A job from its hash: a dict (HGETALL) or the flat list a script returns. A claim's
    list may leave a long payload out (``payload_apart``, see ``claimed_fields`` in
    ``lua/_common.lua``): the job's payload is then empty until ``_with_payloads``."""
    if isinstance(fields, dict):
        d = fields
    else:
        d = {fields[i]: fields[i + 1] for i in range(0, len(fields), 2)}
    return Job(
        id=d[b"id"].decode(),
        task=d[b"task"].decode(),
        queue=d[b"queue"].decode(),
        state=JobState(d[b"state"].decode()),
        payload=b"" if b"payload_apart" in d else d[b"payload"],
        priority=int(d[b"priority"]),
        attempt=int(d.get(b"attempt", 0)),
        max_attempts=int(d.get(b"max_attempts", 1)),
        run_at=float(d[b"run_at"]),
        enqueued_at=float(d[b"enqueued_at"]),
        started_at=_num(d.get(b"started_at")),
        finished_at=_num(d.get(b"finished_at")),
        timeout_s=_num(d.get(b"timeout_s")),
        key=_text(d.get(b"key")),
        lease_token=_text(d.get(b"lease_token")),
        lease_expires_at=_num(d.get(b"lease_expires_at")),
        worker_id=_text(d.get(b"worker_id")),
        lost_leases=int(d.get(b"lost_leases", 0)),
        cancel_requested=d.get(b"cancel_requested") == b"1",
        result=d.get(b"result"),
        error=decode_error(d.get(b"error")),
        progress=_num(d.get(b"progress")),
        progress_message=_text(d.get(b"progress_message")),
        meta=decode_meta(d.get(b"meta")),
    )


def _listable(replies: Sequence[Any]) -> list[Job]:
    """The jobs of HGETALL replies (empty ones: deleted meanwhile); a hash that does not read
    as a job is left out (logged), so a listing shows the others."""
    try:
        return [_job(flat) for flat in replies if flat]
    except Exception:
        pass
    jobs = []
    for flat in replies:
        if flat:
            try:
                jobs.append(_job(flat))
            except Exception as exc:
                shown = flat.get(b"id", b"?")[:80]
                log.warning("listing leaves out job hash %r, unreadable: %r", shown, exc)
    return jobs


def _run_at_of_score(score: float) -> float:
    """A ready job's run_at from its score (``ready_score`` in ``lua/_common.lua``:
    ``-priority * 2^40`` plus milliseconds since 2025, which are less than 2^40)."""
    return (int(score) % _PRIORITY_STEP + _READY_EPOCH_MS) / 1000


def _netstrings(packed: bytes) -> list[bytes]:
    """``b"3:foo5:hello"`` -> ``[b"foo", b"hello"]`` (how a hand-over carries a job's hash)."""
    fields: list[bytes] = []
    i = 0
    while i < len(packed):
        colon = packed.index(b":", i)
        end = colon + 1 + int(packed[i:colon])
        fields.append(packed[colon + 1 : end])
        i = end
    return fields


def _finish_args(finishes: Sequence[Finish]) -> list[Any]:
    args: list[Any] = [len(finishes)]
    for f in flatten_outcomes(finishes, time.time()):
        if f.kind == RETRY:
            # the delay, not the time: the script adds it to the server's clock
            args += (f.job_id, f.token, RETRY, repr(f.delay_s), f.error)
        else:
            args += (f.job_id, f.token, f.kind, f.result or f.error or b"", b"")
    return args


def _enqueue_args(jobs: Sequence[NewJob], on_conflict: OnConflict) -> list[Any]:
    args: list[Any] = [on_conflict, len(jobs)]
    for j in jobs:
        args += (
            j.id, j.task, j.queue, j.payload, j.priority,
            "" if j.run_at is None else repr(j.run_at), repr(j.delay_s), j.max_attempts,
            "" if j.timeout_s is None else repr(j.timeout_s), j.key or "",
            encode_meta(j.meta) or "",
        )  # fmt: skip
    return args


def _enqueue_result(jobs: Sequence[NewJob], reply: list[Any]) -> EnqueueResult:
    result = EnqueueResult(ids=[j.id for j in jobs])
    for n in range(0, len(reply), 2):  # only jobs stored already or whose key matched come back
        i = int(reply[n]) - 1
        result.ids[i] = reply[n + 1].decode()
        result.existing.add(i)
    return result


def _packed(conn: Any, *args: Any) -> list[bytes]:
    """A command as the bytes to send on ``conn``: packed by hiredis in one call, where redis-py
    encodes argument by argument in Python (about 10 us of a ~80 us send()), unless the URL
    asked redis-py for another text encoding than UTF-8."""
    encoder = conn.encoder
    if encoder.encoding.lower() in ("utf-8", "utf8") and encoder.encoding_errors == "strict":
        return [pack_command(args)]
    return list(conn.pack_command(*args))


def _refused(script: str, exc: ResponseError) -> DuplicateJobError | BrokerError:
    """A script's error reply as ours: the enqueue script's DUPLICATE, or a plain refusal."""
    text = str(exc)
    if text.startswith("DUPLICATE"):
        _, existing, key = text.split(" ", 2)
        return DuplicateJobError(key, existing)
    error = BrokerError(f"Redis refused {script}: {text}")
    error.__cause__ = exc
    return error


class _ThreadConnection:
    """A thread's own connection for blocking sends, in that thread's locals."""

    __slots__ = ("__weakref__", "conn", "pid")

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.pid = os.getpid()


def _drop_connection(broker: weakref.ref[RedisBroker], conn: Any) -> None:
    """Close a connection whose thread ended (unless the broker closed it already)."""
    owner = broker()
    if owner is not None:
        with owner._io_lock:
            owner._sync_connections.discard(conn)
    with contextlib.suppress(Exception):
        conn.disconnect()


class RedisBroker(Broker, ScheduleStore, WorkflowStore, LimitStore, EventBus):
    name = "redis"
    capabilities = Capabilities(
        shared_across_processes=True,
        server_clock=True,
        transactional_enqueue=False,
        push_wakeups=True,
    )

    def __init__(self, url: str) -> None:
        self.url = url
        self._redis_url, self.prefix, self.unavailable_after_s = parse_url(url)
        self.where = redact_url(self._redis_url).split("://", 1)[-1].split("@")[-1].split("?")[0]
        """host:port/db, for messages (never the password)."""
        self.result_ttl_s = Settings().result_ttl_s
        self._io: Portal | None = None
        self._io_lock = threading.Lock()
        self._aclients: dict[asyncio.AbstractEventLoop, Any] = {}
        self._ablocking: dict[asyncio.AbstractEventLoop, Any] = {}
        self._attached: set[asyncio.AbstractEventLoop] = set()
        # loops a worker detached from: no client may be made on them again (an orphaned wait
        # going on there would open a connection that nothing closes)
        self._detached: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
        # per loop: waits whose callers were cancelled, still blocked (ended by detach)
        self._orphans: dict[asyncio.AbstractEventLoop, set[asyncio.Future[Any]]] = {}
        # per worker: hand-overs its waits received ('id token'), acknowledged by its next claim
        self._delivered: dict[str, list[str]] = {}
        self._sync: Any = None
        self._sync_local = threading.local()
        self._sync_connections: set[Any] = set()
        self._checked = False

    def configure(self, settings: Settings) -> None:
        self.result_ttl_s = settings.result_ttl_s

    # --- connections ----------------------------------------------------------------------

    def _io_loop(self) -> asyncio.AbstractEventLoop:
        io = self._io
        if io is None:
            with self._io_lock:  # two threads' first calls must not start two loops
                if self._io is None:
                    self._io = Portal(name="taskmill-redis-io")
                io = self._io
        return io.loop

    # Clients are typed Any: redis-py annotates every reply as a union of what any
    # decode_responses setting could give, so each use would need a cast. Replies are bytes.
    def _client(self) -> Any:
        """The async client of the running loop: the I/O loop's, or an attached worker's."""
        loop = asyncio.get_running_loop()
        client = self._aclients.get(loop)
        if client is None:
            self._check_not_detached(loop)
            client = self._aclients[loop] = aredis.Redis.from_url(
                self._redis_url, socket_connect_timeout=2, socket_timeout=10,
                health_check_interval=30,
            )  # fmt: skip
        return client

    def _blocking_client(self) -> Any:
        # blocking reads get their own pool so they never hold up claims and finishes
        loop = asyncio.get_running_loop()
        self._check_not_detached(loop)  # each time: a wait may outlive its loop's detach
        client = self._ablocking.get(loop)
        if client is None:
            # no retries of its own: a BLPOP whose socket was closed (a detaching worker ends
            # its orphaned waits so) must end, not block again; the worker retries a wait
            client = self._ablocking[loop] = aredis.Redis.from_url(
                self._redis_url,
                socket_connect_timeout=2,
                socket_timeout=_MAX_BLOCK_S + 10,
                retry=Retry(NoBackoff(), 0),
            )
        return client

    def _check_not_detached(self, loop: asyncio.AbstractEventLoop) -> None:
        if loop in self._detached:
            raise BrokerUnavailableError(
                "the worker detached from this event loop: no new Redis connection is made here"
            )

    def _sync_client(self) -> Any:
        if self._sync is None:
            timeout = min(10.0, self.unavailable_after_s)
            self._sync = redis.Redis.from_url(
                self._redis_url, socket_connect_timeout=min(2.0, timeout), socket_timeout=timeout
            )
        return self._sync

    def _unavailable(self, exc: BaseException, *, writes: bool = True) -> BrokerUnavailableError:
        """``writes``: the call may have changed jobs, so say what a caller may assume."""
        message = (
            f"Redis at {self.where} did not answer within {self.unavailable_after_s:g} s "
            f"({type(exc).__name__}: {exc})"
        )
        if writes:
            message += (
                ". A write that was under way may still have been applied; sending the same "
                "job again is safe (its id is checked)"
            )
        return BrokerUnavailableError(scrub(message, self.url))

    def _misconfigured(self, exc: Exception) -> BrokerError | None:
        """The error that says why this URL cannot work with the server it names (a port that
        is not Redis's, credentials or a database index the server refuses); None for other
        errors. Retrying cannot help: the error is ``permanent``."""
        if isinstance(exc, InvalidResponse):
            message = (
                f"the server at {self.where} does not answer as Redis does ({exc}): is this "
                "the port of a Redis server?"
            )
        elif isinstance(exc, AuthenticationError | AuthorizationError):
            given = "its" if url_secrets(self.url) else "no"
            message = f"Redis at {self.where} refused the connection with {given} password: {exc}"
        elif isinstance(exc, NoPermissionError) or (
            isinstance(exc, ResponseError) and any(sign in str(exc) for sign in _ACL_REFUSALS)
        ):
            message = (
                f"Redis at {self.where} refused this URL's user ({exc}): its ACL must allow "
                f"the keys and channels that start with the prefix {self.prefix!r} and the "
                "commands taskmill runs (docs/brokers.md, ACL users)"
            )
        elif isinstance(exc, ResponseError) and "DB index" in str(exc):
            message = (
                f"Redis at {self.where} refused the database the URL names ({exc}); the "
                "server's `databases` setting (16 by default) bounds the index"
            )
        else:
            return None
        return BrokerError(scrub(message, self.url), permanent=True)

    def _tls_refused(self, exc: BaseException) -> BrokerError | None:
        """The permanent error for a TLS handshake that no retry fixes (a certificate that
        does not verify, a TLS client at a port that does not speak TLS); else None."""
        text = str(exc)
        if not any(sign in text for sign in _TLS_REFUSALS):
            return None
        return BrokerError(
            scrub(f"Redis at {self.where} refused over TLS: {text}", self.url), permanent=True
        )

    async def _retrying(self, call: Callable[[], Awaitable[T]], *, writes: bool = True) -> T:
        """Retry on a lost connection with back-off for up to ``unavailable_after_s`` in all:
        each attempt gets only the time that is left, so a server that accepts connections
        but never answers (frozen, overloaded) fails as soon as one that is down.
        ``writes=False``: ``call`` only reads."""
        deadline = time.monotonic() + self.unavailable_after_s
        delay = 0.05
        while True:
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
                # that lands as the call completes, and a cancelled worker task then hangs
                async with asyncio.timeout(max(0.01, deadline - time.monotonic())):
                    return await call()
            except _MISCONFIGURED as exc:
                refused = self._misconfigured(exc)
                if refused is None:
                    raise
                raise refused from exc
            except (*_UNAVAILABLE, TimeoutError) as exc:
                tls = self._tls_refused(exc)
                if tls is not None:
                    raise tls from exc
                if time.monotonic() + delay > deadline:
                    raise self._unavailable(exc, writes=writes) from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _eval(self, name: str, *args: Any) -> Any:
        async def call() -> Any:
            client = self._client()
            try:
                return await client.evalsha(SHAS[name], 0, self.prefix, *args)
            except NoScriptError:  # a restarted or flushed server: load and run again
                await client.script_load(SCRIPTS[name])
                return await client.evalsha(SHAS[name], 0, self.prefix, *args)

        try:
            return await self._retrying(call)
        except ResponseError as exc:
            raise _refused(name, exc) from None

    def _sync_connection(self) -> Any:
        """This thread's own connection for blocking sends. Commands go straight to it, not
        through the client and its pool: that bookkeeping cost a send() loop about a third of
        its rate. One per thread (and per process: a forked child opens its own)."""
        held: _ThreadConnection | None = getattr(self._sync_local, "held", None)
        if held is None or held.pid != os.getpid():
            # made from the pool's settings but not counted by it: a pool allows 100, and a
            # program whose threads come and go (a thread pool) sends from many more
            pool = self._sync_client().connection_pool
            held = _ThreadConnection(pool.connection_class(**pool.connection_kwargs))
            self._sync_local.held = held
            with self._io_lock:
                self._sync_connections.add(held.conn)
            # the thread's locals go when it ends, and with them its connection
            weakref.finalize(held, _drop_connection, weakref.ref(self), held.conn)
        return held.conn

    def _eval_blocking(self, name: str, *args: Any) -> Any:
        conn = self._sync_connection()
        command = _packed(conn, "EVALSHA", SHAS[name], 0, self.prefix, *args)
        deadline = time.monotonic() + self.unavailable_after_s
        delay = 0.05
        while True:
            try:
                try:
                    conn.send_packed_command(command)
                    return conn.read_response()
                except NoScriptError:  # a restarted or flushed server: load and run again
                    conn.send_command("SCRIPT", "LOAD", SCRIPTS[name])
                    conn.read_response()
                    conn.send_packed_command(command)
                    return conn.read_response()
            except _MISCONFIGURED as exc:
                refused = self._misconfigured(exc)
                if refused is None:
                    if isinstance(exc, ResponseError):
                        raise _refused(name, exc) from None
                    raise
                conn.disconnect()
                raise refused from exc
            except _UNAVAILABLE as exc:
                conn.disconnect()  # reconnects on the next send
                tls = self._tls_refused(exc)
                if tls is not None:
                    raise tls from exc
                if time.monotonic() + delay > deadline:
                    raise self._unavailable(exc) from exc
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    @on_io_loop
    async def open(self) -> None:
        await self._retrying(self._client().ping, writes=False)
        if not self._checked:
            self._checked = True
            try:
                await self._check_server()
                await self._index_older_jobs()
            except ResponseError as exc:  # e.g. an ACL that does not allow the prefix's keys
                refused = self._misconfigured(exc)
                if refused is None:
                    raise
                raise refused from exc
            await self.epoch(mark=True)

    @on_io_loop
    async def epoch(self, *, mark: bool = False) -> str | None:
        key = self._key("epoch")
        if mark:
            new = uuid.uuid4().hex
            await self._retrying(lambda: self._client().set(key, new, nx=True))
        value = await self._retrying(lambda: self._client().get(key), writes=False)
        return None if value is None else value.decode() if isinstance(value, bytes) else value

    async def _check_server(self) -> None:
        client = self._client()
        try:
            policy = (await client.config_get("maxmemory-policy")).get("maxmemory-policy")
        except ResponseError:
            return  # CONFIG is disabled on some managed services
        if policy and str(policy).startswith("allkeys-"):
            log.warning(
                "Redis runs with maxmemory-policy=%s: under memory pressure it may evict "
                "pending jobs. Use noeviction (or a volatile-* policy) for a job queue.",
                policy,
            )

    async def _index_older_jobs(self) -> None:
        """Jobs stored by a taskmill from before the ``jobs`` index (layout 2) get into it,
        below every newer job, by id (time-ordered); once per server and prefix."""
        client = self._client()
        if int(await client.get(self._key("layout")) or 0) >= _LAYOUT:
            return
        ids: set[bytes] = set()
        for queue in await self._queues():
            for state in JobState:
                key = self._index(queue, state)
                if state is JobState.RUNNING:
                    ids.update(await client.smembers(key))
                else:
                    ids.update(await client.zrange(key, 0, -1))
        ordered = sorted(ids)
        for start in range(0, len(ordered), 1000):
            scores = {
                m: i - len(ordered) for i, m in enumerate(ordered[start : start + 1000], start)
            }
            await client.zadd(self._key("jobs"), scores, nx=True)
        await client.set(self._key("layout"), _LAYOUT)

    async def close(self) -> None:
        await self.detach()
        if self._io is not None:
            await self._close_clients()
            self._io.close()
            self._io = None
        with self._io_lock:
            connections, self._sync_connections = self._sync_connections, set()
        for conn in connections:
            conn.disconnect()
        self._sync_local = threading.local()
        if self._sync is not None:
            self._sync.close()
            self._sync = None

    @on_io_loop
    async def _close_clients(self) -> None:
        await self._close_loop_clients()

    async def _close_loop_clients(self) -> None:
        loop = asyncio.get_running_loop()
        blocking = self._ablocking.get(loop)
        # waits whose callers were cancelled may still block on the server: closing their
        # sockets ends them at once (a cancel might wait out the block); those not blocking
        # yet end at their next step (_check_not_detached). Again until all ended: one may
        # have taken a connection from the pool just after it was emptied, and one that
        # ended with a wake token adds the push that gives it back, to see through too.
        while True:
            if blocking is not None:
                await blocking.connection_pool.disconnect()
            orphans = self._orphans.pop(loop, set())
            if not orphans:
                break
            _, pending = await asyncio.wait(orphans, timeout=0.5)
            self._orphans.setdefault(loop, set()).update(pending)
        for clients in (self._aclients, self._ablocking):
            client = clients.pop(loop, None)
            if client is not None:
                await client.aclose()

    async def attach(self) -> None:
        loop = asyncio.get_running_loop()
        self._detached.discard(loop)
        self._attached.add(loop)

    async def detach(self) -> None:
        loop = asyncio.get_running_loop()
        if loop in self._attached:
            self._attached.discard(loop)
            self._detached.add(loop)
            await self._close_loop_clients()

    # --- producers ------------------------------------------------------------------------

    @on_io_loop
    async def enqueue(
        self, jobs: Sequence[NewJob], *, on_conflict: OnConflict = "return"
    ) -> EnqueueResult:
        reply = await self._eval("enqueue", *_enqueue_args(jobs, on_conflict))
        return _enqueue_result(jobs, reply)

    def enqueue_blocking(
        self,
        jobs: Sequence[NewJob],
        *,
        on_conflict: OnConflict = "return",
        connection: Any = None,
    ) -> EnqueueResult:
        if connection is not None:
            raise TypeError("the Redis broker has no transactions: connection= is not supported")
        reply = self._eval_blocking("enqueue", *_enqueue_args(jobs, on_conflict))
        return _enqueue_result(jobs, reply)

    # --- workers --------------------------------------------------------------------------

    async def claim(
        self, queues: Sequence[str], limit: int, worker_id: str, lease_s: float
    ) -> list[Job]:
        return (await self.finish_and_claim((), queues, limit, worker_id, lease_s))[1]

    @on_io_loop
    async def finish_and_claim(
        self,
        finishes: Sequence[Finish],
        queues: Sequence[str],
        limit: int,
        worker_id: str,
        lease_s: float,
    ) -> tuple[list[bool], list[Job]]:
        token = os.urandom(8).hex()
        acked = self._delivered.pop(worker_id, [])
        try:
            reply = await self._eval(
                "claim", worker_id, repr(lease_s), limit, token, len(queues), *queues,
                len(acked), *acked, repr(self.result_ttl_s), *_finish_args(finishes),
            )  # fmt: skip
        except BaseException:
            self._delivered.setdefault(worker_id, [])[:0] = acked
            raise
        applied = [c == "1" for c in reply[1].decode()]
        try:
            jobs = [_job(flat) for flat in reply[2:]]
        except Exception:  # one hash is unreadable: the others are claimed all the same
            jobs = await self._readable(reply[2:], token)
        return applied, await self._with_payloads(jobs)

    async def _with_payloads(self, jobs: list[Job]) -> list[Job]:
        """``jobs``, each with its payload: those a claim or a hand-over left out (empty: see
        ``_job``) are read in one round trip. A payload does not change once sent, and the
        claim holds the job."""
        apart = [j for j in jobs if not j.payload]
        if not apart:
            return jobs

        async def call() -> list[Any]:
            async with self._client().pipeline(transaction=False) as pipe:
                for job in apart:
                    pipe.hget(self._key("job", job.id), "payload")
                return list(await pipe.execute())

        for job, payload in zip(apart, await self._retrying(call, writes=False), strict=True):
            job.payload = payload or b""  # gone: a deleted hash; it fails to decode
        return jobs

    async def _readable(self, replies: Sequence[Any], token: str) -> list[Job]:
        """The jobs of claimed hashes that read as jobs; each other one is failed at once
        (``SerializationError`` naming its key and what is wrong), logged, not run. The claim
        wrote its ``id``, ``queue`` and lease token, so a finish can fail it."""
        jobs: list[Job] = []
        failures: list[Finish] = []
        for flat in replies:
            try:
                jobs.append(_job(flat))
            except Exception as exc:
                fields = {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}
                job_id = fields[b"id"].decode("utf-8", "replace")
                error = unreadable_record(f"key {self._key('job', job_id)}", exc)
                log.error("%s", error.message)
                failures.append(Finish(Claim(job_id, token), Failed(error)))
        if failures:
            await self._eval("finish", repr(self.result_ttl_s), *_finish_args(failures))
        return jobs

    @on_io_loop
    async def heartbeat(
        self, worker: WorkerInfo, claims: Sequence[Claim], lease_s: float
    ) -> HeartbeatReply:
        args: list[Any] = [
            repr(lease_s), worker.id, _encoder.encode(worker), max(30, int(lease_s * 2)),
            len(claims),
        ]  # fmt: skip
        for c in claims:
            args += (c.job_id, c.token)
        lost, cancel = await self._eval("heartbeat", *args)
        return HeartbeatReply(
            lost={i.decode() for i in lost}, cancel_requested={i.decode() for i in cancel}
        )

    @on_io_loop
    async def finish(self, finishes: Sequence[Finish]) -> list[bool]:
        reply = await self._eval("finish", repr(self.result_ttl_s), *_finish_args(finishes))
        return [c == "1" for c in reply.decode()]

    @on_io_loop
    async def record_progress(self, items: Sequence[Progress]) -> None:
        args: list[Any] = [len(items)]
        for p in items:
            fraction = "" if p.fraction is None else repr(p.fraction)
            args += (p.claim.job_id, p.claim.token, fraction, p.message or "")
        await self._eval("progress", *args)

    @on_io_loop
    async def recover(self, max_lost_leases: int) -> list[tuple[str, JobState]]:
        reply = await self._eval(
            "recover",
            max_lost_leases,
            repr(self.result_ttl_s),
            RECOVERED_ERROR_TYPE,
            RECOVERED_MESSAGE,
        )
        return [
            (reply[i].decode(), JobState(reply[i + 1].decode())) for i in range(0, len(reply), 2)
        ]

    @on_io_loop
    async def wait(
        self, queues: Sequence[str], timeout: float, handover: HandOver | None = None
    ) -> list[Job]:
        if asyncio.get_running_loop() not in self._attached:
            # a reply that reached this loop can miss a caller on another one that was
            # cancelled meanwhile; the job would wait out its lease. Workers attach their loop.
            handover = None
        block = asyncio.ensure_future(self._register_and_block(queues, timeout, handover))
        try:
            # shielded: redis-py lets a cancel that lands as a command starts go unnoticed
            # until the command ends, and BLPOP's end is the whole block (a stopping worker
            # took 5 s one time in six, measured); the caller goes on at once
            popped = await asyncio.shield(block)
        except asyncio.CancelledError:
            orphans = self._orphans.setdefault(asyncio.get_running_loop(), set())
            orphans.add(block)
            block.add_done_callback(orphans.discard)
            block.add_done_callback(self._orphaned_pop)
            raise
        if popped is None or handover is None or not popped[0].endswith(b":inbox"):
            return []
        job_id, token, fields = popped[1].split(b" ", 2)
        # its payload first: a wait that ends here (an error, a cancel) leaves the job to the
        # worker's next claim, which takes every handed job not acknowledged
        jobs = await self._with_payloads([_job(_netstrings(fields))])
        # acknowledged by the worker's next claim: until then the job stays in its `handed` set
        delivered = self._delivered.setdefault(handover.worker_id, [])
        delivered.append(f"{job_id.decode()} {token.decode()}")
        return jobs

    async def _register_and_block(
        self, queues: Sequence[str], timeout: float, handover: HandOver | None
    ) -> tuple[bytes, bytes] | None:
        """Register as idle (for hand-overs, if given), then block on the queues' wake-up
        lists (and the worker's inbox) until one has an entry or ``timeout``."""
        timeout = min(timeout, _MAX_BLOCK_S)
        worker = handover.worker_id if handover else ""
        lease_s = handover.lease_s if handover else 0.0
        # the registration outlives the BLPOP a little: the worker's next claim ends it
        now, next_due, ready = await self._eval(
            "idle", worker, repr(lease_s), repr(timeout + 1.0), len(queues), *queues
        )
        if next_due:
            timeout = min(timeout, max(0.0, float(next_due) - float(now)))
        if int(ready) or timeout <= 0.001:
            return None
        lists = [self._key("q", q, "wake") for q in queues]
        if handover:
            lists.insert(0, self._key("w", worker, "inbox"))
        # BLPOP takes whole seconds on Redis < 6, fractions since; the minimum we ask is 10 ms
        popped: tuple[bytes, bytes] | None = await self._blocking_client().blpop(
            lists, timeout=max(0.01, timeout)
        )
        return popped

    def _orphaned_pop(self, block: asyncio.Future[tuple[bytes, bytes] | None]) -> None:
        """What a wait whose caller was cancelled took: a wake token goes back, so the next
        idle worker is not left asleep; a hand-over stays in the worker's ``handed`` set
        (never counted as delivered), where its next claim or its sign-off takes it back."""
        if block.cancelled() or block.exception() is not None:
            return
        popped = block.result()
        if popped is None or popped[0].endswith(b":inbox"):
            return
        key, value = popped[0].decode(), popped[1]
        # the worker's loop is closing, or detached with its client gone: it stops anyway
        with contextlib.suppress(RuntimeError, BrokerUnavailableError):
            task = asyncio.ensure_future(self._client().lpush(key, value))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            # a detach under way sees it through before it closes the client it runs on
            orphans = self._orphans.setdefault(task.get_loop(), set())
            orphans.add(task)
            task.add_done_callback(orphans.discard)

    @on_io_loop
    async def unregister_worker(self, worker_id: str) -> None:
        acked = self._delivered.pop(worker_id, [])
        await self._eval("unregister", worker_id, len(acked), *acked)

    @on_io_loop
    async def prune(self, finished_before: float, limit: int = 1000) -> int:
        return int(await self._eval("prune", repr(finished_before), limit))

    # --- inspection and management ----------------------------------------------------------

    @on_io_loop
    async def now(self) -> float:
        seconds, micros = await self._retrying(self._client().time, writes=False)
        return float(seconds + micros / 1e6)

    @on_io_loop
    async def get(self, job_id: str) -> Job | None:
        fields = await self._retrying(
            lambda: self._client().hgetall(self._key("job", job_id)), writes=False
        )
        return _job(fields) if fields else None

    @on_io_loop
    async def get_by_key(self, key: str) -> Job | None:
        holder = await self._retrying(
            lambda: self._client().get(self._key("key", key)), writes=False
        )
        if holder is None:
            return None
        fields = await self._retrying(
            lambda: self._client().hgetall(self._key("job", holder.decode())), writes=False
        )
        job = _job(fields) if fields else None
        # The holder may have finished between the two reads: its key is free by then.
        if job is None or job.state.finished or job.key != key:
            return None
        return job

    @on_io_loop
    async def get_many(self, job_ids: Sequence[str]) -> list[Job | None]:
        if not job_ids:
            return []

        async def call() -> list[Any]:  # one round trip: a pipeline of HGETALLs
            async with self._client().pipeline(transaction=False) as pipe:
                for job_id in job_ids:
                    pipe.hgetall(self._key("job", job_id))
                return list(await pipe.execute())

        replies = await self._retrying(call, writes=False)
        return [_job(fields) if fields else None for fields in replies]

    async def _queues(self) -> list[str]:
        names = await self._retrying(
            lambda: self._client().smembers(self._key("queues")), writes=False
        )
        return sorted(n.decode() for n in names)

    def _index(self, queue: str, state: JobState) -> str:
        """The key of the index holding a queue's jobs in a state (``running`` is a set)."""
        what = {JobState.QUEUED: "ready", JobState.SCHEDULED: "scheduled"}.get(state, state.value)
        return self._key("q", queue, what)

    @on_io_loop
    async def find_jobs(
        self, query: JobQuery, *, limit: int = 100, cursor: str | None = None, count: bool = False
    ) -> JobPage:
        client = self._client()
        queues = [query.queue] if query.queue is not None else await self._queues()
        indexes = [(q, s) for q in queues for s in sorted(query.states or JobState)]
        sizes: list[int] = []
        if indexes:
            async with client.pipeline(transaction=False) as pipe:
                for q, s in indexes:
                    key = self._index(q, s)
                    pipe.scard(key) if s is JobState.RUNNING else pipe.zcard(key)
                sizes = [int(n) for n in await pipe.execute()]
        if query.order == "finished":
            after = None if cursor is None else decode_cursor(cursor, "finished", (float, str))
            streams = [self._index(q, s) for q, s in indexes]
            source = self._merged(client, streams, after)
        else:
            after_seq = None if cursor is None else decode_cursor(cursor, "enqueued", (int,))[0]
            narrow = bool(query.states) or query.queue is not None
            if narrow and sum(sizes) <= _NARROW_MAX:
                source = self._sorted_by_seq(client, indexes, after_seq, first=limit + 1)
            else:
                after = None if after_seq is None else [float(after_seq), ""]
                source = self._merged(client, [self._key("jobs")], after)
        matched = await self._first_matches(client, query, source, limit + 1)
        jobs = await self._jobs_of([job_id for _, job_id in matched[:limit]])
        next_cursor = None
        if len(matched) > limit:
            score, job_id = matched[limit - 1]
            position = (score, job_id) if query.order == "finished" else (int(score),)
            next_cursor = encode_cursor(query.order, *position)
        total, estimated = None, False
        if count and (query.task is not None or query.meta):
            total, estimated = await self._count(client, query, indexes, sizes)
        elif count:
            total = sum(sizes)
        return JobPage(jobs, next_cursor, total, total_estimated=estimated)

    async def _merged(
        self, client: Any, streams: list[str], after: list[Any] | None
    ) -> AsyncGenerator[list[tuple[float, str]], None]:
        """(score, id) of sorted sets merged, highest score first (then highest id), after
        the position ``after`` [score, id], in growing chunks."""
        chunk = 100
        while streams:
            async with client.pipeline(transaction=False) as pipe:
                for key in streams:
                    if after is None:
                        pipe.zrange(key, "+inf", "-inf", desc=True, byscore=True,
                                    offset=0, num=chunk, withscores=True)  # fmt: skip
                    else:  # ties with the cursor's score come first, if their id is lower
                        score = repr(after[0])
                        pipe.zrange(key, score, score, byscore=True)
                        pipe.zrange(key, f"({score}", "-inf", desc=True, byscore=True,
                                    offset=0, num=chunk, withscores=True)  # fmt: skip
                replies = await pipe.execute()
            entries: list[tuple[float, str]] = []
            exhausted: set[str] = set()
            step = 1 if after is None else 2
            for n, key in enumerate(streams):
                reply = replies[n * step + step - 1]
                if after is not None:
                    ties = [m.decode() for m in replies[n * step]]
                    entries += [(after[0], t) for t in ties if t < after[1]]
                entries += [(float(sc), m.decode()) for m, sc in reply]
                if len(reply) < chunk:
                    exhausted.add(key)
            entries.sort(reverse=True)
            # each stream gave its next `chunk`, so the first `chunk` merged are the next ones
            taken = entries[:chunk]
            if not taken:
                return
            yield taken
            after = [taken[-1][0], taken[-1][1]]
            if len(entries) <= chunk:
                streams = [k for k in streams if k not in exhausted]
            chunk = min(chunk * 2, 2000)

    async def _sorted_by_seq(
        self,
        client: Any,
        indexes: list[tuple[str, JobState]],
        after: int | None,
        first: int,
    ) -> AsyncGenerator[list[tuple[float, str]], None]:
        """The jobs of a few indexes (a narrow filter), newest first: read them all and
        sort by their position in ``jobs``; in batches from ``first`` entries, growing (a
        page most often needs only its own jobs checked). Sorted here, not in a script:
        a script's call per job would hold the server for tens of ms at 10,000 jobs."""
        async with client.pipeline(transaction=False) as pipe:
            for q, s in indexes:
                key = self._index(q, s)
                pipe.smembers(key) if s is JobState.RUNNING else pipe.zrange(key, 0, -1)
            ids = sorted({m.decode() for reply in await pipe.execute() for m in reply})
        if not ids:
            return
        scores = await client.zmscore(self._key("jobs"), ids)
        ordered = sorted(
            ((float(sc), i) for sc, i in zip(scores, ids, strict=True) if sc is not None),
            reverse=True,
        )
        if after is not None:
            ordered = [e for e in ordered if e[0] < after]
        start, size = 0, first
        while start < len(ordered):
            yield ordered[start : start + size]
            start, size = start + size, min(size * 2, 2000)

    async def _first_matches(
        self,
        client: Any,
        query: JobQuery,
        source: AsyncGenerator[list[tuple[float, str]], None],
        wanted: int,
    ) -> list[tuple[float, str]]:
        """The first ``wanted`` entries of ``source`` whose job passes the query's filters
        (read from each job's hash; jobs gone meanwhile are skipped)."""
        matched: list[tuple[float, str]] = []
        async with contextlib.aclosing(source):
            async for batch in source:
                passed = await self._passes(client, query, batch)
                for entry, ok in zip(batch, passed, strict=True):
                    if ok:
                        matched.append(entry)
                        if len(matched) >= wanted:
                            return matched
        return matched

    async def _passes(
        self, client: Any, query: JobQuery, batch: Sequence[tuple[float, str]]
    ) -> list[bool]:
        async with client.pipeline(transaction=False) as pipe:
            for _, job_id in batch:
                pipe.hmget(self._key("job", job_id), "state", "queue", "task", "meta")
            rows = await pipe.execute()
        states = {s.value.encode() for s in query.states}
        queue = None if query.queue is None else query.queue.encode()
        task = None if query.task is None else query.task.encode()
        return [
            state is not None
            and (not states or state in states)
            and (queue is None or q == queue)
            and (task is None or (t or b"").startswith(task))
            and (not query.meta or meta_matches(decode_meta(meta), query.meta))
            for state, q, t, meta in rows
        ]

    async def _jobs_of(self, ids: Sequence[str]) -> list[Job]:
        if not ids:
            return []
        async with self._client().pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(self._key("job", job_id))
            return _listable(await pipe.execute())

    async def _count(
        self, client: Any, query: JobQuery, indexes: list[tuple[str, JobState]], sizes: list[int]
    ) -> tuple[int, bool]:
        """How many jobs of the indexes pass a task or meta filter, and whether that is an
        estimate: every job is read while they hold at most ``COUNT_SCAN_MAX``; past that,
        the newest of each index in proportion to its size, and the share that passes is
        taken for the whole."""
        total = sum(sizes)
        share = min(1.0, COUNT_SCAN_MAX / total) if total else 1.0
        taken = [(q, s, n, math.ceil(n * share)) for (q, s), n in zip(indexes, sizes, strict=True)]

        async def sample() -> AsyncGenerator[list[tuple[float, str]], None]:
            for q, s, _, k in taken:
                key = self._index(q, s)
                if k == 0:
                    continue
                if s is JobState.RUNNING:
                    members = await client.smembers(key)
                else:
                    members = await client.zrange(key, -k, -1)
                ids = [(0.0, m.decode()) for m in members]
                for start in range(0, len(ids), 1000):
                    yield ids[start : start + 1000]

        passed = len(await self._first_matches(client, query, sample(), 2**62))
        if share == 1.0:
            return passed, False
        read = sum(k for *_, k in taken)
        return round(passed / read * total), True

    @on_io_loop
    async def stats(self) -> list[QueueStats]:
        queues = await self._queues()
        client = self._client()
        paused = {p.decode() for p in await client.smembers(self._key("paused"))}
        server_now = await self.now()
        out = []
        for q in sorted(set(queues) | paused):
            async with client.pipeline(transaction=False) as pipe:
                pipe.zcard(self._key("q", q, "scheduled"))
                pipe.zcard(self._key("q", q, "ready"))
                pipe.scard(self._key("q", q, "running"))
                for s in _FINISHED:
                    pipe.zcard(self._key("q", q, s.value))
                pipe.zrange(self._key("q", q, "ready"), 0, 999, withscores=True)
                *counts, ready = await pipe.execute()
            states = [JobState.SCHEDULED, JobState.QUEUED, JobState.RUNNING, *_FINISHED]
            oldest = await self._oldest_ready(client, ready, server_now)
            out.append(
                QueueStats(
                    queue=q,
                    counts={s.value: int(n) for s, n in zip(states, counts, strict=True)},
                    oldest_waiting_s=None if oldest is None else max(0.0, server_now - oldest),
                    paused=q in paused,
                )
            )
        return out

    @on_io_loop
    async def finished_per_minute(
        self, since: float, queue: str | None = None
    ) -> list[tuple[int, JobState, int]]:
        queues = [queue] if queue is not None else await self._queues()
        first, last = int(since // 60), int((await self.now()) // 60)
        cells = [(m, q, s) for m in range(first, last + 1) for q in queues for s in _FINISHED]

        async def call() -> list[Any]:  # one round trip: a ZCOUNT per minute, queue and state
            async with self._client().pipeline(transaction=False) as pipe:
                for m, q, s in cells:
                    low = repr(since) if m == first else str(m * 60)
                    pipe.zcount(self._index(q, s), low, f"({(m + 1) * 60}")
                return list(await pipe.execute())

        counted: dict[tuple[int, JobState], int] = {}
        for (m, _, s), n in zip(cells, await self._retrying(call, writes=False), strict=True):
            if n:
                counted[m, s] = counted.get((m, s), 0) + int(n)
        return [(m, s, n) for (m, s), n in counted.items()]

    @on_io_loop
    async def delete(self, job_ids: Sequence[str]) -> list[str]:
        if not job_ids:
            return []
        return [i.decode() for i in await self._eval("delete", *dict.fromkeys(job_ids))]

    async def _oldest_ready(
        self, client: Any, ready: list[tuple[bytes, float]], now: float
    ) -> float | None:
        """The earliest run_at of these ready jobs (the first 1,000 to run), read from their
        scores; a score that reads as a time to come was made of a run_at before 2025 (a
        past ``run_at`` given at send), which only the job's hash has."""
        run_ats = [_run_at_of_score(score) for _, score in ready]
        odd = [member for (member, _), at in zip(ready, run_ats, strict=True) if at > now + 1]
        if odd:
            async with client.pipeline(transaction=False) as pipe:
                for job_id in odd:
                    pipe.hget(self._key("job", job_id.decode()), "run_at")
                run_ats += [float(r) for r in await pipe.execute() if r is not None]
        return min((at for at in run_ats if at <= now + 1), default=None)

    @on_io_loop
    async def list_workers(self) -> list[WorkerInfo]:
        client = self._client()
        ids = await self._retrying(lambda: client.zrange(self._key("workers"), 0, -1), writes=False)
        if not ids:
            return []
        raw = await client.mget([self._key("worker", i.decode()) for i in ids])
        decoder = msgspec.json.Decoder(WorkerInfo)
        workers = [decoder.decode(r) for r in raw if r is not None]
        return sorted(workers, key=lambda w: w.started_at)

    @on_io_loop
    async def retry(self, job_ids: Sequence[str] | None) -> list[str]:
        args: list[Any] = [-1] if job_ids is None else [len(job_ids), *job_ids]
        return [i.decode() for i in await self._eval("retry", *args)]

    @on_io_loop
    async def cancel(self, job_id: str) -> JobState | None:
        state = await self._eval("cancel", job_id, repr(self.result_ttl_s))
        return None if state is None else JobState(state.decode())

    @on_io_loop
    async def run_now(self, job_id: str) -> JobState | None:
        state = await self._eval("run_now", job_id)
        return None if state is None else JobState(state.decode())

    @on_io_loop
    async def purge(self, queue: str) -> int:
        return int(await self._eval("purge", queue))

    @on_io_loop
    async def pause(self, queue: str, paused: bool) -> None:
        async def call() -> None:
            client = self._client()
            if paused:
                await client.sadd(self._key("paused"), queue)
            else:
                await client.srem(self._key("paused"), queue)
                await client.lpush(self._key("q", queue, "wake"), 1)

        await self._retrying(call)

    @on_io_loop
    async def schedule_marks(self) -> dict[str, float]:
        async def call() -> dict[str, float]:
            pairs = await self._client().zrange(self._key("schedules"), 0, -1, withscores=True)
            return {name.decode(): float(tick) for name, tick in pairs}

        return await self._retrying(call, writes=False)

    @on_io_loop
    async def mark_schedules(self, marks: Mapping[str, float]) -> None:
        if not marks:
            return

        async def call() -> None:  # GT: a mark only moves forward (Redis >= 6.2)
            await self._client().zadd(self._key("schedules"), dict(marks), gt=True)

        await self._retrying(call)

    @on_io_loop
    async def save_workflow(self, workflow_id: str, spec: bytes) -> None:
        await self._eval("save_workflow", workflow_id, spec)

    @on_io_loop
    async def get_workflow(self, workflow_id: str) -> WorkflowRecord | None:
        key = self._key("wf", workflow_id)
        fields = await self._retrying(lambda: self._client().hgetall(key), writes=False)
        if not fields:
            return None
        finished = fields.get(b"finished_at")
        return WorkflowRecord(
            id=workflow_id,
            spec=fields[b"spec"],
            state=fields[b"state"].decode(),
            created_at=float(fields[b"created_at"]),
            finished_at=float(finished) if finished is not None else None,
        )

    @on_io_loop
    async def end_workflow(self, workflow_id: str, state: str) -> bool:
        ttl = max(1, int(self.result_ttl_s))
        return bool(await self._eval("end_workflow", workflow_id, state, ttl))

    @on_io_loop
    async def reopen_workflow(self, workflow_id: str) -> bool:
        return bool(await self._eval("reopen_workflow", workflow_id))

    @on_io_loop
    async def running_workflows(self, limit: int = 1000) -> list[str]:
        key = self._key("workflows")
        ids = await self._retrying(lambda: self._client().zrange(key, 0, limit - 1), writes=False)
        return [i.decode() for i in ids]

    @on_io_loop
    async def reserve_rate_slot(self, bucket: str, interval_s: float) -> float:
        return float(await self._eval("rate_slot", bucket, repr(interval_s)))

    @on_io_loop
    async def acquire_slot(self, bucket: str, holder: str, limit: int, ttl_s: float) -> bool:
        return bool(await self._eval("slot", bucket, holder, limit, repr(ttl_s)))

    @on_io_loop
    async def release_slot(self, bucket: str, holder: str) -> None:
        key = self._key("slots", bucket)
        await self._retrying(lambda: self._client().zrem(key, holder))

    @on_io_loop
    async def queue_depth(self, queue: str) -> int:
        async def call() -> int:
            async with self._client().pipeline(transaction=False) as pipe:
                pipe.zcard(self._key("q", queue, "ready"))
                pipe.zcard(self._key("q", queue, "scheduled"))
                ready, scheduled = await pipe.execute()
            return int(ready) + int(scheduled)

        return await self._retrying(call, writes=False)

    @on_io_loop
    async def publish_events(self, payload: bytes) -> None:
        channel = self._key("events")
        await self._retrying(lambda: self._client().publish(channel, payload))

    def events_subscription(self) -> Subscription:
        return _RedisSubscription(self._redis_url, self._key("events"))


class _RedisSubscription(Subscription):
    """Redis pub/sub on a connection of its own, on the subscriber's loop."""

    def __init__(self, url: str, channel: str) -> None:
        self._client: Any = aredis.Redis.from_url(url, socket_connect_timeout=2)
        self._pubsub: Any = self._client.pubsub(ignore_subscribe_messages=True)
        self._channel = channel

    async def start(self) -> None:
        await self._pubsub.subscribe(self._channel)

    async def get(self) -> bytes:
        while True:
            message = await self._pubsub.get_message(timeout=None)
            if message is not None and message.get("type") == "message":
                data: bytes = message["data"]
                return data

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._pubsub.aclose()
        with contextlib.suppress(Exception):
            await self._client.aclose()
