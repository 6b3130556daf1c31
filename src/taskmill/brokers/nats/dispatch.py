"""Pulling dispatch messages: one ``Lane`` per (queue, priority) pull consumer and loop.

A claim pulls with ``no_wait`` into an inbox of its own and stops at the batch size or at the
server's "no messages" status, so it never waits for work. An idle worker's wait sends one
long pull (``expires``) per lane to a second inbox; whatever arrives there later is kept as
``spare`` and taken first by the next claim.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg

from taskmill.brokers.nats.connection import status

_END = {"404", "408", "409"}
"""No messages, request expired, or a limit reached: the pull is over."""


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
        self.arrived = asyncio.Event()
        self._lock = asyncio.Lock()
        self._waiting_until = 0.0
        self._subs: list[Any] = []

    async def start(self) -> None:
        self._subs = [
            await self.nc.subscribe(self._claim_inbox, cb=self._on_claimed),
            await self.nc.subscribe(self._wait_inbox, cb=self._on_waited),
        ]

    async def close(self) -> None:
        # messages a long pull brought that no claim took: handed back at once, not left to
        # come back only when the ack wait runs out
        while self.spare:
            msg = self.spare.popleft()
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

    async def pull(self, batch: int, timeout: float) -> list[Msg]:
        """Up to ``batch`` messages available now (the spare ones first)."""
        taken: list[Msg] = []
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

    async def long_pull(self, expires_s: float, now: float) -> None:
        """Ask for one message within ``expires_s`` (unless such a request is out already)."""
        if self._waiting_until > now:
            return
        self._waiting_until = now + expires_s
        request = {"batch": 1, "expires": int(expires_s * 1e9)}
        await self.nc.publish(self._next, json.dumps(request).encode(), reply=self._wait_inbox)
