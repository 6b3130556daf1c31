"""``LISTEN`` in PostgreSQL: the wake-ups idle workers wait on, and live events' subscriptions.

Enqueues, finishes and recoveries ``pg_notify`` the wake-up channel in the same statement as
their write, so a notification is sent when (and only if) the job is committed. Payloads are
``q<queue>`` (work is due now) or ``s<seconds> <queue>`` (a job comes due in that many seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from taskmill.brokers.features import Subscription

log = logging.getLogger("taskmill.brokers.postgres")


class Listener:
    """``LISTEN`` on a connection of its own, on one event loop, for as long as that loop
    serves claims and waits.

    Notifications are counted as they arrive, whether or not anyone waits, so a job committed
    between a worker's empty claim and its ``wait`` still wakes it: the claim remembers the
    count (``seq``) and the wait compares. A lost connection is re-established with back-off,
    and each (re)connection counts as a wake-up for everyone, since notifications sent while
    nobody listened are gone.
    """

    def __init__(self, conninfo: str, channel: str) -> None:
        self._conninfo = conninfo
        self._channel = channel
        self.seq = 0
        self._reset_seq = 0
        self._due: dict[str, int] = {}  # queue -> seq of its last "work is due" notification
        self._scheduled: deque[tuple[int, str, float]] = deque(maxlen=1024)
        self._changed = asyncio.Event()
        self._listening = asyncio.Event()
        self.ever_listened = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="taskmill-postgres-listen"
            )

    async def listening(self, timeout: float) -> None:
        """Until the first ``LISTEN`` is in place (or ``timeout``: then claims go on, and a
        wake-up counts once it is)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._listening.wait()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            # gather, not a suppressed CancelledError: a cancel of the caller (a worker's
            # bounded shutdown) must not be swallowed with the task's own
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        delay = 0.05
        while True:
            try:
                await self._listen()
            except (psycopg.Error, OSError) as exc:
                if self.ever_listened:
                    log.warning("listening for wake-ups failed, reconnecting: %s", exc)
            except Exception:  # a bug of ours: keep listening, workers would otherwise poll
                log.exception("listening for wake-ups failed unexpectedly, reconnecting")
            self._listening.clear()
            self._wake_everyone()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _listen(self) -> None:
        conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
        async with conn:
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
            self._listening.set()
            self.ever_listened = True
            self._wake_everyone()  # what was sent while we were not listening is lost
            async for notify in conn.notifies():
                self._on_notify(notify.payload)

    def _on_notify(self, payload: str) -> None:
        self.seq += 1
        kind, rest = payload[:1], payload[1:]
        if kind == "q":
            self._due[rest] = self.seq
        elif kind == "s":
            delay, _, queue = rest.partition(" ")
            try:
                seconds = max(0.0, float(delay))
            except ValueError:
                seconds = 0.0
            self._scheduled.append((self.seq, queue, time.monotonic() + seconds))
        else:  # not ours to parse: wake up rather than miss work
            self._reset_seq = self.seq
        self._bump()

    def _wake_everyone(self) -> None:
        self.seq += 1
        self._reset_seq = self.seq
        self._bump()

    def _bump(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait(self, queues: Sequence[str], since: int, deadline: float) -> None:
        """Until work for ``queues`` was notified after ``since``, or ``deadline`` (monotonic),
        brought forward by any job of ``queues`` scheduled meanwhile."""
        while True:
            if self._reset_seq > since or any(self._due.get(q, 0) > since for q in queues):
                return
            for seq, queue, due in self._scheduled:
                if seq > since and queue in queues:
                    deadline = min(deadline, due)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await changed.wait()


class PostgresSubscription(Subscription):
    """``LISTEN`` on a connection of its own, on the subscriber's loop."""

    def __init__(self, conninfo: str, channel: str) -> None:
        self._conninfo = conninfo
        self._channel = channel
        self._conn: psycopg.AsyncConnection[TupleRow] | None = None
        self._notifies: Any = None

    async def start(self) -> None:
        self._conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
        await self._conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
        self._notifies = self._conn.notifies()

    async def get(self) -> bytes:
        assert self._notifies is not None
        notify = await self._notifies.__anext__()
        return str(notify.payload).encode()

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
