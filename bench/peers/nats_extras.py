"""taskmill's send() on NATS against one nats-py connection's ceilings (bench.compare_nats's
lines under the table; run with the project's virtualenv).

    python -m bench.peers.nats_extras N     # prints one JSON line

Ceilings, each a loop of N calls on one connection, awaited one at a time as a ``send()`` is:

- ``flush_loop``: ``nc.flush()``, a PING and its PONG: a bare round trip;
- ``publish_loop``: ``js.publish`` to a file stream with a ``Nats-Msg-Id``: a round trip whose
  answer waits for the message to be stored (and fsynced, with ``sync_interval: always``),
  what any durable enqueue costs at least;
- ``kv_create_loop``: ``kv.create`` of a new key in a file Key-Value bucket: the same, with the
  "must not exist" check the server does;
- ``pipelined_publish``: the publishes of a tenth of N sent with ``js.publish_async`` and their
  acks awaited together: what a bulk enqueue can reach when it does not wait for each ack;
- ``atomic_batch``: the same publishes as nats-server 2.12's atomic batches (ADR-50) of up to
  1,000, each message sent without a reply, the last one's request committing the batch.

Then, where ``taskmill.brokers.nats`` can be imported, ``send_loop``: ``drain_probe.send()`` of
``bench.peers.taskmill_app`` (``TASKMILL_URL``); the four loops take turns in tenths, so a load
that comes and goes on the machine weighs on each alike. And in a pass of its own, per ``send()``,
the nats-py requests (each awaits its reply: a round trip unless several are in flight at once),
flushes (round trips), publishes with a reply subject (``publish_async``: replies awaited
later, pipelined) and plain publishes (no reply: acks, events) it made.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import nats
from nats.aio.client import Client
from nats.js.api import KeyValueConfig, StorageType, StreamConfig
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

_calls = {"request": 0, "flush": 0, "publish": 0, "reply_publish": 0}


def _count_calls() -> None:
    """Count nats-py's requests, flushes and publishes made outside a request (every client in
    this process: the broker's connection too), those with a reply subject apart (as
    ``js.publish_async`` sends: a reply awaited later, so pipelined)."""
    request, flush, publish = Client.request, Client.flush, Client.publish
    in_request = [0]

    async def counted_request(self: Client, *args: Any, **kwargs: Any) -> Any:
        _calls["request"] += 1
        in_request[0] += 1
        try:
            return await request(self, *args, **kwargs)
        finally:
            in_request[0] -= 1

    async def counted_flush(self: Client, *args: Any, **kwargs: Any) -> Any:
        _calls["flush"] += 1
        return await flush(self, *args, **kwargs)

    async def counted_publish(self: Client, *args: Any, **kwargs: Any) -> Any:
        if not in_request[0]:  # request() publishes too: counted there
            reply = kwargs.get("reply") or (args[2] if len(args) > 2 else "")
            _calls["reply_publish" if reply else "publish"] += 1
        return await publish(self, *args, **kwargs)

    Client.request = counted_request  # type: ignore[method-assign]
    Client.flush = counted_flush  # type: ignore[method-assign]
    Client.publish = counted_publish  # type: ignore[method-assign]


def taskmill_send() -> Callable[[], None] | None:
    """``drain_probe.send`` of taskmill's bench app, or None while there is no NATS broker."""
    try:
        importlib.import_module("taskmill.brokers.nats")
    except ImportError:
        return None
    from bench.peers.taskmill_app import drain_probe

    return drain_probe.send


async def _take_turns(
    loops: dict[str, Callable[[int], Awaitable[None]]], n: int
) -> dict[str, float]:
    """Each loop's calls per second: the loops take turns in tenths of ``n`` calls."""
    spent = dict.fromkeys(loops, 0.0)
    chunk = max(1, n // 10)
    for _ in range(10):
        for name, loop in loops.items():
            t0 = time.perf_counter()
            await loop(chunk)
            spent[name] += time.perf_counter() - t0
    return {name: 10 * chunk / seconds for name, seconds in spent.items()}


async def _calls_per_send(send_loop: Callable[[int], Awaitable[None]], k: int) -> dict[str, float]:
    _count_calls()
    before = dict(_calls)
    await send_loop(k)
    return {f"{kind}s_per_send": (_calls[kind] - before[kind]) / k for kind in _calls}


class _Loops:
    """The ceiling loops, on one connection, a file stream and a file Key-Value bucket."""

    def __init__(self, nc: Client, js: JetStreamContext, name: str, kv: KeyValue) -> None:
        self.nc, self.js, self.name, self.kv = nc, js, name, kv
        self.counter = 0

    def _next(self) -> str:
        self.counter += 1
        return str(self.counter)

    async def flush_loop(self, k: int) -> None:
        for _ in range(k):
            await self.nc.flush()

    async def publish_loop(self, k: int) -> None:
        for _ in range(k):
            await self.js.publish(f"{self.name}.x", b"", headers={"Nats-Msg-Id": self._next()})

    async def kv_create_loop(self, k: int) -> None:
        for _ in range(k):
            await self.kv.create(f"k{self._next()}", b"")

    async def pipelined_publish(self, k: int) -> None:
        # every publish sent before any ack is awaited (nats-py's window: 4,000 in flight)
        futures = []
        for _ in range(k):
            headers = {"Nats-Msg-Id": self._next()}
            futures.append(await self.js.publish_async(f"{self.name}.x", b"", headers=headers))
        await asyncio.gather(*futures)

    async def atomic_batch(self, k: int) -> None:
        # nats-server 2.12's atomic batch publish (ADR-50; the stream allows it): up to 1,000
        # messages with no reply each, the last one's request commits them all and is acked
        for start in range(0, k, 1000):
            size = min(1000, k - start)
            batch = f"b{self._next()}"
            for i in range(1, size + 1):
                headers = {"Nats-Batch-Id": batch, "Nats-Batch-Sequence": str(i),
                           "Nats-Msg-Id": self._next()}  # fmt: skip
                if i < size:
                    await self.nc.publish(f"{self.name}atomic.x", b"", headers=headers)
                else:
                    headers["Nats-Batch-Commit"] = "1"
                    reply = await self.nc.request(f"{self.name}atomic.x", b"", 5, headers=headers)
                    assert b'"error"' not in reply.data, reply.data


async def ceilings(url: str, n: int, send: Callable[[], None] | None) -> dict[str, Any]:
    nc = await nats.connect(url.split(","), connect_timeout=5)
    js = nc.jetstream()
    name = f"ceiling{uuid.uuid4().hex[:8]}"
    await js.add_stream(StreamConfig(name=name, subjects=[f"{name}.>"], storage=StorageType.FILE))
    await js.add_stream(
        StreamConfig(
            name=f"{name}atomic",
            subjects=[f"{name}atomic.>"],
            storage=StorageType.FILE,
            allow_atomic=True,
        )
    )
    kv = await js.create_key_value(KeyValueConfig(bucket=name, storage=StorageType.FILE))
    ceiling = _Loops(nc, js, name, kv)

    async def send_loop(k: int) -> None:
        assert send is not None
        # taskmill's send() is synchronous (it runs the broker on a loop of its own): in a
        # thread, so that this loop's connection keeps being served meanwhile
        await asyncio.to_thread(lambda: [send() for _ in range(k)])

    loops: dict[str, Callable[[int], Awaitable[None]]] = {
        "flush_loop": ceiling.flush_loop,
        "publish_loop": ceiling.publish_loop,
        "kv_create_loop": ceiling.kv_create_loop,
        "pipelined_publish": ceiling.pipelined_publish,
        "atomic_batch": ceiling.atomic_batch,
    }
    if send is not None:
        await send_loop(1)  # open the broker (connect, streams, buckets) outside the timed part
        loops["send_loop"] = send_loop
    out: dict[str, Any] = {**await _take_turns(loops, n), "n": 10 * max(1, n // 10)}
    if send is not None:
        out.update(await _calls_per_send(send_loop, max(1, n // 10)))
    await js.delete_stream(name)
    await js.delete_stream(f"{name}atomic")
    await js.delete_key_value(name)
    await nc.close()
    return out


def main() -> None:
    n = int(sys.argv[1])
    url = os.environ["CMP_NATS_URL"]
    print(json.dumps(asyncio.run(ceilings(url, n, taskmill_send()))), flush=True)


if __name__ == "__main__":
    main()
