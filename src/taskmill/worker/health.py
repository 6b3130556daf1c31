"""A liveness endpoint for worker processes (``taskmill worker --health-port PORT``).

A tiny HTTP/1.0 server on a thread of its own (its own asyncio loop and ``start_server``; no
web framework). Every ``GET`` or ``HEAD`` answers ``200`` while the status function says the
worker is healthy and ``503`` otherwise, with the status as one line of JSON. Running on its
own thread, it still answers (``503``) while the worker's event loop is blocked, for example
by a sync task on ``--pool async``: that is when a liveness probe matters.

Healthy means a recent heartbeat: the broker took one within ``max_age_s`` (three heartbeat
intervals, the rule ``taskmill workers`` uses to call a worker lost). Before its first
heartbeat, a worker that started at most ``max_age_s`` ago is healthy too (``"starting"``): it
is not late yet, and a probe right after start-up must not fail it. One that is still without a
heartbeat after that is stuck (``"no heartbeat"``: the broker unreachable, its loop blocked).

>>> heartbeat_status(None, started=98.0, max_age_s=6.0, now=100.0)
(True, {'status': 'starting', 'heartbeat_age_s': None, 'max_age_s': 6.0})
>>> heartbeat_status(None, started=90.0, max_age_s=6.0, now=100.0)[1]['status']
'no heartbeat'
>>> heartbeat_status(97.5, started=90.0, max_age_s=6.0, now=100.0)
(True, {'status': 'ok', 'heartbeat_age_s': 2.5, 'max_age_s': 6.0})
>>> heartbeat_status(90.0, started=80.0, max_age_s=6.0, now=100.0)[1]['status']
'stale'

A worker out of contact (no heartbeat taken for longer than its lease: it dropped its jobs and
claims none, see ``taskmill.worker.leases``) is unhealthy whatever the age says:

>>> heartbeat_status(97.5, started=90.0, max_age_s=6.0, now=100.0, out_of_contact=True)
(False, {'status': 'out of contact', 'heartbeat_age_s': 2.5, 'max_age_s': 6.0})
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

log = logging.getLogger("taskmill.health")


Status = tuple[bool, dict[str, Any]]
"""(healthy, details): the details become the response's JSON body."""

_READ_TIMEOUT_S = 5.0
_MAX_REQUEST_BYTES = 8192


def heartbeat_status(
    last_ok: float | None,
    *,
    started: float,
    max_age_s: float,
    now: float,
    out_of_contact: bool = False,
) -> Status:
    """Healthy if the last heartbeat the broker took (``last_ok``, a ``time.monotonic()``
    value; ``None``: none yet) is at most ``max_age_s`` old, or, with none yet, if the worker
    started (``started``, a ``time.monotonic()`` value) at most ``max_age_s`` ago; never while
    ``out_of_contact``."""
    max_age_s = round(max_age_s, 3)
    if last_ok is None:
        starting = now - started <= max_age_s
        status = "starting" if starting else "no heartbeat"
        return starting, {"status": status, "heartbeat_age_s": None, "max_age_s": max_age_s}
    age = round(now - last_ok, 3)
    healthy = age <= max_age_s and not out_of_contact
    status = "out of contact" if out_of_contact else "ok" if healthy else "stale"
    return healthy, {
        "status": status,
        "heartbeat_age_s": age,
        "max_age_s": max_age_s,
    }


class HealthServer:
    """Serves ``status()`` over HTTP on ``host:port`` (port 0: any free port; see ``port``)
    from a daemon thread. ``start()`` returns once the port is bound, or raises ``OSError``
    (the port is taken, say); ``close()`` stops it."""

    def __init__(self, host: str, port: int, status: Callable[[], Status]) -> None:
        self.host = host
        self.port = port
        self.status = status
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> HealthServer:
        bound: Future[int] = Future()
        self._thread = threading.Thread(
            target=asyncio.run, args=(self._serve(bound),), name="taskmill-health", daemon=True
        )
        self._thread.start()
        self.port = bound.result()
        return self

    def close(self) -> None:
        loop, stop, thread = self._loop, self._stop, self._thread
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # its loop ended already
                loop.call_soon_threadsafe(stop.set)
        if thread is not None:
            thread.join(10.0)

    async def _serve(self, bound: Future[int]) -> None:
        try:
            server = await asyncio.start_server(
                self._handle, self.host, self.port, limit=_MAX_REQUEST_BYTES
            )
        except OSError as exc:
            bound.set_exception(exc)
            return
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        bound.set_result(server.sockets[0].getsockname()[1])
        async with server:
            await self._stop.wait()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_READ_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
            method = head.split(b" ", 1)[0].decode("ascii", "replace")
            writer.write(self._response(method))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # not an HTTP request we can answer: just hang up
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _response(self, method: str) -> bytes:
        if method not in ("GET", "HEAD"):
            return _http(405, b'{"status": "method not allowed"}\n', head_only=False)
        try:
            healthy, details = self.status()
        except Exception as exc:  # a bug of ours must show as unhealthy, not as a hang-up
            log.exception("health status failed")
            healthy, details = False, {"status": "error", "error": str(exc)}
        body = json.dumps(details, separators=(", ", ": ")).encode() + b"\n"
        return _http(200 if healthy else 503, body, head_only=method == "HEAD")


_REASONS = {200: "OK", 405: "Method Not Allowed", 503: "Service Unavailable"}


def _http(code: int, body: bytes, *, head_only: bool) -> bytes:
    head = (
        f"HTTP/1.0 {code} {_REASONS[code]}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n\r\n"
    ).encode("ascii")
    return head if head_only else head + body


__all__ = ["HealthServer", "Status", "heartbeat_status"]
