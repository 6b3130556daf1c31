"""Pulling dispatch messages: one ``Lane`` per (queue, priority) pull consumer and loop.

A claim pulls with ``no_wait`` into an inbox of its own and stops at the batch size or at the
server's "no messages" status, so it never waits for work. An idle worker's wait sends one
long pull (``expires``) per lane to a second inbox; whatever arrives there later is kept as
``spare`` and taken first by the next claim.

A claim pulls a window of pointers to take the oldest ``run_at`` first, and needs fewer than
it pulled when few slots are free. The rest are ``kept`` for the next claim rather than
handed back at once: handed back, each was delivered again, and a worker claiming one job at
a time (``-c 4``) pulled 8 pointers and handed back 7 per job. A kept pointer is handed back
if no claim took it within ``KEEP_S``, so a busy worker holds none from the others for long.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import time
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg

from taskmill.brokers.nats.connection import status

_END = {"404", "408", "409"}
"""No messages, request expired, or a limit reached: the pull is over."""
KEEP_S = 0.02
"""How long a pointer a claim pulled but did not take waits for this worker's next claim."""
BACK_IN_SIGHT_S = 0.01
"""Allowed for nats-server to apply a hand-back and deliver the pointer again: it applies
one after a pull sent just after it, so that pull does not see the pointer."""


class Lane:
    def __init__(self, nc: Client, stream: str, consumer: str, priority: int) -> None:
        self.nc = nc
        self.consumer = consumer
        self.priority = priority
        self._next = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._claim_inbox = nc.new_inbox()
        self._wait_inbox = nc.new_inbox()
        self._got: asyncio.Queue[Msg] = asyncio.Queue()
        self.spare: collections.deque[Msg] = collections.deque()
        self.kept: collections.deque[tuple[float, Msg]] = collections.deque()
        self._expiry: asyncio.TimerHandle | None = None
        self._handing_back: set[asyncio.Task[None]] = set()
        self.arrived = asyncio.Event()
        self._lock = asyncio.Lock()
        self._waiting_until = 0.0
        self._subs: list[Any] = []
        self.back_in_sight = 0.0
        """When the kept pointers this lane handed back last are delivered again."""
        self.emptied_for: str | None = None
        """The worker to whom a hand-over gave this lane's last pending message (``emptied``)."""

    async def start(self) -> None:
        self._subs = [
            await self.nc.subscribe(self._claim_inbox, cb=self._on_claimed),
            await self.nc.subscribe(self._wait_inbox, cb=self._on_waited),
        ]

    async def close(self) -> None:
        # messages a long pull brought, or a claim kept, that no claim took: handed back at
        # once, not left to come back only when the ack wait runs out
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        unclaimed = [msg for _, msg in self.kept] + list(self.spare)
        self.kept.clear()
        self.spare.clear()
        for msg in unclaimed:
            if msg.reply:
                with contextlib.suppress(Exception):
                    await self.nc.publish(msg.reply, b"-NAK")
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs = []

    async def _on_claimed(self, msg: Msg) -> None:
        self._got.put_nowait(msg)

    async def _on_waited(self, msg: Msg) -> None:
        code = status(msg)
        if code is None:
            # the long pull asked for one message: this one ends it (no status follows)
            self._waiting_until = 0.0
            self.spare.append(msg)
            self.arrived.set()
        elif code in _END:
            self._waiting_until = 0.0

    def hand_over(self, worker_id: str) -> Msg:
        """The first message a long pull brought, taken for ``worker_id``'s hand-over; noted
        if it was the lane's last pending one (``emptied``)."""
        msg = self.spare.popleft()
        self.emptied_for = worker_id if _none_pending(msg) else None
        return msg

    def emptied(self, worker_id: str) -> bool:
        """Whether the message last handed over to ``worker_id`` was the lane's last pending
        one and nothing came since: that worker's next claim, the one right after its
        hand-over, need not pull here (it would find nothing; its next wait sends a long
        pull, which brings whatever came meanwhile). Asked once per claim, for every lane:
        the answer is good for that one claim."""
        emptied = self.emptied_for == worker_id and not self.kept and not self.spare
        self.emptied_for = None
        return emptied

    def keep(self, msg: Msg) -> None:
        """Hold a pulled message for this worker's next claim, for ``KEEP_S`` at most."""
        self.kept.append((time.monotonic(), msg))
        if self._expiry is None:
            self._expiry = asyncio.get_running_loop().call_later(KEEP_S, self._expire)

    def _expire(self) -> None:
        self._expiry = None
        task = asyncio.ensure_future(self._hand_back_kept())
        self._handing_back.add(task)
        task.add_done_callback(self._handing_back.discard)

    async def _hand_back_kept(self) -> None:
        """Hand back the kept messages that waited ``KEEP_S``; look again for the others."""
        now = time.monotonic()
        while self.kept and now - self.kept[0][0] >= KEEP_S * 0.9:
            _, msg = self.kept.popleft()
            self.back_in_sight = now + BACK_IN_SIGHT_S
            with contextlib.suppress(Exception):
                await msg.nak()
        if self.kept and self._expiry is None:
            wait = max(0.001, KEEP_S - (now - self.kept[0][0]))
            self._expiry = asyncio.get_running_loop().call_later(wait, self._expire)

    async def pull(self, batch: int, timeout: float) -> list[Msg]:
        """Up to ``batch`` messages available now (the kept ones first, then the spare)."""
        taken: list[Msg] = []
        while self.kept and len(taken) < batch:
            taken.append(self.kept.popleft()[1])
        while self.spare and len(taken) < batch:
            taken.append(self.spare.popleft())
        if len(taken) >= batch:
            return taken
        async with self._lock:
            request = {"batch": batch - len(taken), "no_wait": True}
            await self.nc.publish(self._next, json.dumps(request).encode(), reply=self._claim_inbox)
            async with asyncio.timeout(timeout):
                while len(taken) < batch:
                    msg = await self._got.get()
                    code = status(msg)
                    if code is None:
                        taken.append(msg)
                    elif code in _END:
                        break
        # a long pull sent earlier is ahead of this one in the consumer's queue: a message
        # stored just now went to it, and the server sends that delivery before this pull's
        # "no messages" (one queue per consumer), so it is in spare by now
        while self.spare and len(taken) < batch:
            taken.append(self.spare.popleft())
        return taken

    def pull_lost(self) -> None:
        """The long pull out may be gone (the connection was lost): the next wait sends one."""
        self._waiting_until = 0.0

    async def long_pull(self, expires_s: float, now: float) -> None:
        """Ask for one message within ``expires_s`` (unless such a request is out already)."""
        if self._waiting_until > now:
            return
        self._waiting_until = now + expires_s
        request = {"batch": 1, "expires": int(expires_s * 1e9)}
        await self.nc.publish(self._next, json.dumps(request).encode(), reply=self._wait_inbox)


def _none_pending(msg: Msg) -> bool:
    """Whether the server had no other message for the consumer when it delivered ``msg``
    (the delivery's metadata counts those not yet delivered)."""
    try:
        return msg.metadata.num_pending == 0
    except Exception:
        return False  # not a JetStream delivery: unknown
