"""Local stand-ins for the external services the ingestion calls: a persona's sources (works,
quotes, profile: pages of documents) and an embedding service that turns documents into
vectors. Both answer after some latency, and faults can be injected per persona and source.

A fault is a *plan*: the behaviours of that source's next calls, one each, then a behaviour
that holds after them::

    services.set_fault("eminescu", "quotes", plan=["429", "timeout"], then="ok")

Behaviours: ``ok``; ``slow`` (the answer comes after ``slow_s``); ``500`` and ``429`` (with
``Retry-After``); ``timeout`` (the answer comes after ``timeout_s``, later than any sane client
waits); ``endless`` (the source never runs out
of pages, so reading it takes for ever); ``stall`` (as ``endless``, and the embedding service
hangs for that source too). Control is over HTTP as well (``PUT /_faults/{persona}/{source}``),
so a fake started by one process can be steered from another.
"""

from __future__ import annotations

import json
import random
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from examples._support.faults import FaultScript

BEHAVIOURS = ("ok", "slow", "500", "429", "timeout", "endless", "stall")
SOURCES = ("profile", "works", "quotes")
PAGE_SIZE = 4
CORPUS_SIZE = {"profile": 3, "works": 12, "quotes": 8}
"""Documents per source: profile is the fastest, as in the seed."""
CHUNKS_PER_DOCUMENT = 5

_PATH = re.compile(r"^/(sources|embed|_faults|_calls)/([A-Za-z0-9_-]{1,64})/([a-z]+)$")


@dataclass
class FakeServices:
    """The two services on one loopback port, served by threads of this process."""

    latency_s: tuple[float, float] = (0.01, 0.05)
    slow_s: float = 1.5
    timeout_s: float = 10.0
    page_delay_s: float = 0.2
    """How long each page of an ``endless`` or ``stall`` source takes."""
    _plans: FaultScript[tuple[str, str]] = field(
        default_factory=lambda: FaultScript(BEHAVIOURS.__contains__, f"one of {BEHAVIOURS}")
    )
    _then: dict[tuple[str, str], str] = field(default_factory=dict)
    _calls: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the fake services first"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeServices:
        services = self

        class Handler(_Handler):
            fake = services

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True  # a hanging answer must not hold up stop()
        threading.Thread(
            target=self._server.serve_forever, name="persona-fakes", daemon=True
        ).start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # wakes every answer that sleeps
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def set_fault(self, persona: str, source: str, plan: list[str], then: str = "ok") -> None:
        unknown = [b for b in [*plan, then] if b not in BEHAVIOURS]
        if unknown or source not in SOURCES:
            raise ValueError(
                f"fault for {persona}/{source}: sources are {SOURCES}, behaviours "
                f"{BEHAVIOURS}; got source {source!r}, behaviours {unknown}"
            )
        self._plans.replace((persona, source), plan)
        with self._lock:
            self._then[persona, source] = then

    def calls(self, persona: str, source: str) -> dict[str, int]:
        """How many calls each endpoint (``sources``, ``embed``) got for this source."""
        with self._lock:
            return {kind: self._calls[kind, persona, source] for kind in ("sources", "embed")}

    def _behaviour(self, kind: str, persona: str, source: str) -> str:
        with self._lock:
            self._calls[kind, persona, source] += 1
            then = self._then.get((persona, source), "ok")
        if kind == "embed":  # the plan is the source's; embedding only stalls with it
            return (
                "stall" if then == "stall" and not self._plans.pending((persona, source)) else "ok"
            )
        return self._plans.next((persona, source)) or then

    def _sleep(self, seconds: float) -> None:
        self._stopping.wait(seconds)


class _Handler(BaseHTTPRequestHandler):
    fake: FakeServices
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the demo's output is the summary

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        self._route("PUT")

    def _route(self, method: str) -> None:
        url = urlsplit(self.path)
        match = _PATH.match(url.path)
        body = self._body()
        if match is None or match[3] not in SOURCES:
            return self._send(404, {"error": f"no such resource: {url.path}"})
        kind, persona, source = match.groups()
        routes = {
            ("GET", "sources"): self._page,
            ("POST", "embed"): self._embed,
            ("PUT", "_faults"): self._put_fault,
            ("GET", "_calls"): self._get_calls,
        }
        route = routes.get((method, kind))
        if route is None:
            return self._send(405, {"error": f"{method} is not allowed on {url.path}"})
        params = {k: v[-1] for k, v in parse_qs(url.query).items()}
        route(persona, source, params, body)

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return None

    def _page(self, persona: str, source: str, params: dict[str, str], body: Any) -> None:
        behaviour = self.fake._behaviour("sources", persona, source)
        if self._fail(behaviour):
            return
        page = int(params.get("page", "0"))
        if behaviour in ("endless", "stall"):
            self.fake._sleep(self.fake.page_delay_s)
            more = True
        else:
            more = (page + 1) * PAGE_SIZE < CORPUS_SIZE[source]
        first = page * PAGE_SIZE
        last = first + PAGE_SIZE if more else CORPUS_SIZE[source]
        documents = [f"{persona} {source} #{n}" for n in range(first, max(first, last))]
        self._send(200, {"documents": documents, "next_page": page + 1 if more else None})

    def _embed(self, persona: str, source: str, params: dict[str, str], body: Any) -> None:
        behaviour = self.fake._behaviour("embed", persona, source)
        if behaviour == "stall":
            self.fake._sleep(3600)
            return self._send(503, {"error": "the embedding service stalled"})
        self._latency()
        documents = body.get("documents") if isinstance(body, dict) else None
        if not isinstance(documents, list):
            return self._send(422, {"error": "a JSON object with a 'documents' list is needed"})
        self._send(200, {"vectors": CHUNKS_PER_DOCUMENT * len(documents)})

    def _put_fault(self, persona: str, source: str, params: dict[str, str], body: Any) -> None:
        if not isinstance(body, dict):
            return self._send(422, {"error": 'a JSON object {"plan": [...], "then": ...}'})
        try:
            self.fake.set_fault(persona, source, list(body.get("plan", [])), body.get("then", "ok"))
        except ValueError as exc:
            return self._send(422, {"error": str(exc)})
        self._send(200, {"persona": persona, "source": source})

    def _get_calls(self, persona: str, source: str, params: dict[str, str], body: Any) -> None:
        self._send(200, self.fake.calls(persona, source))

    def _fail(self, behaviour: str) -> bool:
        """Answer with the injected fault, if it is one; True if it answered."""
        if behaviour in ("slow", "timeout"):
            self.fake._sleep(self.fake.slow_s if behaviour == "slow" else self.fake.timeout_s)
        else:
            self._latency()
        if behaviour == "500":
            self._send(500, {"error": "internal server error (injected)"})
        elif behaviour == "429":
            self._send(429, {"error": "too many requests (injected)"}, {"Retry-After": "1"})
        return behaviour in ("500", "429")

    def _latency(self) -> None:
        self.fake._sleep(random.uniform(*self.fake.latency_s))

    def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (its timeout, or a killed worker): nobody to tell
