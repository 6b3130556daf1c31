"""Gemini, as the video tasks see it: a small async client, and a local fake of the service.

The client speaks the shape of ``POST /v1beta/models/{model}:generateContent`` over plain
asyncio streams and sorts failures into the two kinds the tasks' retry policy needs:
``GeminiTransientError`` (429, 5xx, no answer in time, connection refused: worth another
attempt) and ``GeminiRequestError`` (any other 4xx: the same request fails the same way).

``FakeGemini`` serves that endpoint on a free loopback port from a thread of its own, with a
random latency and injected failures: a random share of 429s, 500s and hangs (the demo), and,
per project (the request's ``labels.project``), a script of failures to play in order, an
outage that lasts until it is lifted, or a slower latency (the tests).
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from examples._support.faults import FaultScript

FAULTS = ("429", "500", "timeout")
"""What a scripted or random failure can be: a status the fake answers, or no answer at all."""


class GeminiError(Exception):
    """A Gemini call that did not produce content."""


class GeminiTransientError(GeminiError):
    """Rate limited, a server error, no answer in time, or unreachable: another attempt may
    succeed."""


class GeminiRequestError(GeminiError):
    """The service refused the request itself (a 4xx other than 429): retrying cannot help."""


async def generate(
    base_url: str, model: str, prompt: str, *, project: str, timeout_s: float
) -> str:
    """Ask ``model`` for text; the first candidate's text, or a ``GeminiError``."""
    body = {
        "contents": [{"role": "user", "parts": [{"text": prompt}]}],
        "labels": {"project": project},
    }
    status, reply = await _post(
        base_url, f"/v1beta/models/{model}:generateContent", body, timeout_s=timeout_s
    )
    if status == 429 or status >= 500:
        raise GeminiTransientError(f"{model} answered {status}: {reply.get('error', reply)}")
    if status != 200:
        raise GeminiRequestError(f"{model} refused the request ({status}): {reply}")
    try:
        return str(reply["candidates"][0]["content"]["parts"][0]["text"])
    except (KeyError, IndexError, TypeError) as exc:
        raise GeminiRequestError(f"{model} answered without a candidate: {reply}") from exc


async def _post(
    base_url: str, path: str, body: dict[str, Any], *, timeout_s: float
) -> tuple[int, dict[str, Any]]:
    parts = urlsplit(base_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    data = json.dumps(body).encode()
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    ).encode() + data
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(request)
                await writer.drain()
                raw = await reader.read()
            finally:
                writer.close()
    except TimeoutError as exc:
        raise GeminiTransientError(f"no answer from Gemini within {timeout_s:g} s") from exc
    except OSError as exc:
        raise GeminiTransientError(f"Gemini at {host}:{port} is unreachable: {exc}") from exc
    head, _, payload = raw.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
        return status, json.loads(payload or b"{}")
    except (IndexError, ValueError) as exc:
        raise GeminiTransientError(f"a malformed answer from Gemini: {head[:80]!r}") from exc


@dataclass
class FakeBehaviour:
    """How the fake answers. Rates are shares of requests (0 to 1); latencies in seconds."""

    latency_s: tuple[float, float] = (0.02, 0.12)
    rate_429: float = 0.0
    rate_500: float = 0.0
    rate_timeout: float = 0.0
    hang_s: float = 30.0
    seed: int = 4


@dataclass
class _Plan:
    outage: bool = False
    latency_s: float | None = None


class FakeGemini:
    """The fake service on ``127.0.0.1`` (a free port), served from a daemon thread.

    ``start()`` returns once it listens; ``url`` is its base URL; ``stop()`` closes it.
    ``script(project, faults)`` makes that project's next requests fail in that order
    (each one of ``FAULTS``); ``outage(project, on)`` fails all of them with 500 until lifted;
    ``slow(project, seconds)`` sets their latency. ``answered`` counts the answers by status
    (``timeout`` for a request it never answered)."""

    def __init__(self, behaviour: FakeBehaviour | None = None) -> None:
        self.behaviour = behaviour or FakeBehaviour()
        self.answered: Counter[str] = Counter()
        self._rng = random.Random(self.behaviour.seed)
        self._plans: dict[str, _Plan] = {}
        self._scripts = FaultScript[str](FAULTS.__contains__, "one of " + ", ".join(FAULTS))
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-gemini")
        self._thread.daemon = True
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeGemini:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self._thread.start()
        serving = asyncio.start_server(self._handle, sock=sock)
        self._server = asyncio.run_coroutine_threadsafe(serving, self._loop).result(10)
        return self

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            handlers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in handlers:
                task.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)
            if self._server is not None:
                await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def script(self, project: str, faults: list[str]) -> None:
        self._scripts.add(project, faults)
        with self._lock:
            self._plans.setdefault(project, _Plan())

    def outage(self, project: str, on: bool) -> None:
        with self._lock:
            self._plans.setdefault(project, _Plan()).outage = on

    def slow(self, project: str, seconds: float) -> None:
        with self._lock:
            self._plans.setdefault(project, _Plan()).latency_s = seconds

    def pending_faults(self, project: str) -> int:
        """How many scripted failures of ``project`` are still to come."""
        return self._scripts.pending(project)

    def _decide(self, project: str) -> tuple[str, float]:
        """The fault for this request ("" for none) and its latency."""
        b = self.behaviour
        with self._lock:
            plan = self._plans.get(project)
            latency = self._rng.uniform(*b.latency_s)
            if plan is not None and plan.latency_s is not None:
                latency = plan.latency_s
            if plan is not None and plan.outage:
                return "500", latency
            scripted = self._scripts.next(project)
            if scripted is not None:
                return scripted, latency
            if plan is not None:  # a scripted project is spared the random failures
                return "", latency
            roll = self._rng.random()
        for fault, rate in (("429", b.rate_429), ("500", b.rate_500), ("timeout", b.rate_timeout)):
            if roll < rate:
                return fault, latency
            roll -= rate
        return "", latency

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = _content_length(head)
            body = json.loads(await reader.readexactly(length) or b"{}")
            model = head.split(b" ", 2)[1].decode().rsplit("/", 1)[-1].split(":", 1)[0]
            project = str(body.get("labels", {}).get("project", ""))
            fault, latency = self._decide(project)
            await asyncio.sleep(latency)
            if fault == "timeout":
                self._count("timeout")
                await asyncio.sleep(self.behaviour.hang_s)
                return
            status, reply = self._reply(fault, model, body)
            self._count(str(status))
            writer.write(_response(status, reply))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass  # a client that went away, or garbage: nothing to answer
        finally:
            writer.close()

    def _reply(self, fault: str, model: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if fault == "429":
            return 429, {"error": {"code": 429, "status": "RESOURCE_EXHAUSTED"}}
        if fault == "500":
            return 500, {"error": {"code": 500, "status": "INTERNAL"}}
        try:
            prompt = body["contents"][0]["parts"][0]["text"]
        except (KeyError, IndexError, TypeError):
            return 400, {"error": {"code": 400, "status": "INVALID_ARGUMENT"}}
        text = f"[{model}] {prompt[:60]}"
        return 200, {"candidates": [{"content": {"parts": [{"text": text}]}}]}

    def _count(self, outcome: str) -> None:
        with self._lock:
            self.answered[outcome] += 1


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


def _response(status: int, reply: dict[str, Any]) -> bytes:
    data = json.dumps(reply).encode()
    reason = {200: "OK", 400: "Bad Request", 429: "Too Many Requests"}.get(status, "Error")
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + data
