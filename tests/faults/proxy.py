"""A fault-injecting TCP proxy between clients and a broker, for the fault suite.

``FaultProxy(host, port)`` listens on a free loopback port and forwards every connection to the
broker at ``host:port``. Its event loop runs on a thread of its own, so a test (any thread)
changes what the network does while clients use it; each method returns once the proxy applies
the change:

- ``set_latency(up_s, down_s)``: delay each byte client→broker (up) and broker→client (down);
  bytes keep their order, the delay of a byte is the one in force when it was read;
- ``drop_connections()``: reset every open connection now (``RST``, both sides); new ones are
  accepted as usual;
- ``blackhole()``: a partition. Bytes stop flowing both ways on every connection, open or new
  (a new one is accepted but not connected upstream), and nothing is closed: the client sees
  silence, never a reset. What was sent meanwhile is held, as TCP would retransmit it;
- ``drop_responses()``: broker→client bytes are thrown away (the broker applied the command,
  the client never hears: an ambiguous commit); client→broker bytes still flow;
- ``heal()``: back to forwarding. Held bytes are delivered (a healed partition delivers what
  TCP retransmits); a connection that lost bytes to ``drop_responses`` is reset instead, its
  stream being corrupt; a connection accepted during a blackhole whose client gave up
  meanwhile is closed without reaching the broker.

Faults combine with latency: ``heal()`` leaves the latency as it is (``set_latency()`` clears
it). ``url(broker_url)`` rewrites a broker URL's ``host:port`` to the proxy's.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import struct
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

T = TypeVar("T")

_CHUNK = 65536


class Mode(enum.Enum):
    FORWARD = "forward"
    BLACKHOLE = "blackhole"
    DROP_RESPONSES = "drop_responses"


@dataclass
class ProxyStats:
    """What the proxy saw (read through ``FaultProxy.stats()``, a copy)."""

    accepted: int = 0
    reset: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    dropped_down: int = 0
    open: int = 0


@dataclass(eq=False)
class _Conn:
    client_reader: asyncio.StreamReader
    client_writer: asyncio.StreamWriter
    upstream_reader: asyncio.StreamReader | None = None
    upstream_writer: asyncio.StreamWriter | None = None
    lost_bytes: bool = False
    client_eof: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    closed: bool = False


def _reset(writer: asyncio.StreamWriter | None) -> None:
    """Close with RST (SO_LINGER 0), not FIN: the peer sees a connection reset."""
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    """See the module docstring. Use as a context manager, or ``start()`` and ``close()``."""

    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1") -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = host
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._mode = Mode.FORWARD
        self._up_s = 0.0
        self._down_s = 0.0
        self._flowing: asyncio.Event | None = None
        self._stats = ProxyStats()

    # --- life cycle -------------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def start(self) -> FaultProxy:
        self._thread.start()
        self._call(self._start())
        return self

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = [t for conn in self._conns for t in conn.tasks]
        for conn in list(self._conns):
            self._drop(conn, reset=True)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    # --- what a test calls --------------------------------------------------------------------

    def url(self, broker_url: str) -> str:
        """``broker_url`` with its host and port replaced by the proxy's (user, path and query
        kept)."""
        parts = urlsplit(broker_url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@" if userinfo else ""
        return urlunsplit(parts._replace(netloc=f"{netloc}{self.host}:{self.port}"))

    def set_latency(self, up_s: float = 0.0, down_s: float = 0.0) -> None:
        async def apply() -> None:
            self._up_s, self._down_s = up_s, down_s

        self._call(apply())

    def drop_connections(self) -> int:
        """Reset every open connection; how many there were."""

        async def apply() -> int:
            conns = list(self._conns)
            for conn in conns:
                self._drop(conn, reset=True)
            return len(conns)

        return self._call(apply())

    def blackhole(self) -> None:
        self._set_mode(Mode.BLACKHOLE)

    def drop_responses(self) -> None:
        self._set_mode(Mode.DROP_RESPONSES)

    def heal(self) -> None:
        self._set_mode(Mode.FORWARD)

    def stats(self) -> ProxyStats:
        async def read() -> ProxyStats:
            return ProxyStats(**{**vars(self._stats), "open": len(self._conns)})

        return self._call(read())

    @property
    def mode(self) -> Mode:
        return self._mode

    def _set_mode(self, mode: Mode) -> None:
        async def apply() -> None:
            assert self._flowing is not None
            self._mode = mode
            if mode is Mode.BLACKHOLE:
                self._flowing.clear()
                return
            if mode is Mode.FORWARD:
                for conn in list(self._conns):
                    if conn.lost_bytes or (conn.client_eof and conn.upstream_writer is None):
                        self._drop(conn, reset=conn.lost_bytes)
            self._flowing.set()

        self._call(apply())

    # --- the forwarding ---------------------------------------------------------------------------

    def _drop(self, conn: _Conn, *, reset: bool) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._conns.discard(conn)
        if reset:
            self._stats.reset += 1
            _reset(conn.client_writer)
            _reset(conn.upstream_writer)
        else:
            conn.client_writer.close()
            if conn.upstream_writer is not None:
                conn.upstream_writer.close()
        current = asyncio.current_task()
        for task in conn.tasks:
            if task is not current:
                task.cancel()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        conn = _Conn(reader, writer)
        this = asyncio.current_task()
        assert this is not None
        conn.tasks.append(this)
        self._conns.add(conn)
        self._stats.accepted += 1
        up: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        down: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        conn.tasks.append(asyncio.create_task(self._read(conn, conn.client_reader, up, "up")))
        try:
            await self._flowing.wait()  # a blackhole: accepted, not connected upstream
            if conn.closed:
                return
            try:
                conn.upstream_reader, conn.upstream_writer = await asyncio.open_connection(
                    self.target_host, self.target_port
                )
            except OSError:
                self._drop(conn, reset=True)
                return
            if conn.closed:  # dropped while connecting
                _reset(conn.upstream_writer)
                return
            conn.tasks += [
                asyncio.create_task(self._write(conn, conn.upstream_writer, up, "up")),
                asyncio.create_task(self._read(conn, conn.upstream_reader, down, "down")),
                asyncio.create_task(self._write(conn, conn.client_writer, down, "down")),
            ]
        except asyncio.CancelledError:
            pass

    async def _read(
        self,
        conn: _Conn,
        reader: asyncio.StreamReader,
        queue: asyncio.Queue[tuple[float, bytes]],
        direction: str,
    ) -> None:
        try:
            while True:
                data = await reader.read(_CHUNK)
                delay = self._up_s if direction == "up" else self._down_s
                await queue.put((time.monotonic() + delay, data))
                if not data:
                    if direction == "up":
                        conn.client_eof = True
                    return
        except (OSError, asyncio.IncompleteReadError):
            await queue.put((time.monotonic(), b""))
        except asyncio.CancelledError:
            pass

    async def _write(
        self,
        conn: _Conn,
        writer: asyncio.StreamWriter,
        queue: asyncio.Queue[tuple[float, bytes]],
        direction: str,
    ) -> None:
        assert self._flowing is not None
        try:
            while True:
                due, data = await queue.get()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                await self._flowing.wait()
                if not data:  # EOF on the other side: pass it on, then close
                    self._drop(conn, reset=False)
                    return
                if direction == "down" and self._mode is Mode.DROP_RESPONSES:
                    conn.lost_bytes = True
                    self._stats.dropped_down += len(data)
                    continue
                writer.write(data)
                await writer.drain()
                if direction == "up":
                    self._stats.bytes_up += len(data)
                else:
                    self._stats.bytes_down += len(data)
        except OSError:
            self._drop(conn, reset=True)
        except asyncio.CancelledError:
            pass
