"""A local stand-in for the seed's Flowise persona API: slow, and wrong when told to be.

``POST /api/v1/prediction`` with ``{"prompt": ..., "batch": N, "count": K}`` answers, after
``latency_s``, K persona objects as JSON separated by newlines (the seed's Flowise answered
several JSON objects in one text body). Faults are injected per (prompt, batch) for the next
``times`` calls: ``"500"``, ``"429"`` (with ``Retry-After``), ``"timeout"`` (answers only after
``seconds``, later than the client waits), ``"reject"`` (422: the prompt is refused, which no
retry fixes) and ``"slow"`` (``seconds`` more latency). It counts calls, and the most calls it
ever had in flight at once: the number the concurrency limit keeps at 5.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

FaultKind = Literal["500", "429", "timeout", "reject", "slow"]

FIRST_NAMES = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Radia"]
LAST_NAMES = ["Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Perlman"]
PLATFORMS = ["facebook", "instagram", "x", "tiktok"]


@dataclass
class Fault:
    kind: FaultKind
    times: int
    seconds: float


class FakeAvatarApi:
    """The fake API on a free loopback port, served by a thread: ``start()``, ``stop()``."""

    def __init__(self, *, latency_s: float = 0.2, retry_after_s: int = 1, port: int = 0) -> None:
        self.latency_s = latency_s
        self.retry_after_s = retry_after_s
        self.calls: dict[tuple[str, int], int] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self._faults: dict[tuple[str, int], Fault] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeAvatarApi:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def inject(
        self, prompt: str, batch: int, kind: FaultKind, *, times: int = 1, seconds: float = 0.0
    ) -> None:
        """The next ``times`` calls for ``(prompt, batch)`` go wrong as ``kind`` says."""
        with self._lock:
            self._faults[(prompt, batch)] = Fault(kind, times, seconds)

    def calls_for(self, prompt: str, batch: int) -> int:
        with self._lock:
            return self.calls.get((prompt, batch), 0)

    def reset_peak(self) -> None:
        with self._lock:
            self.max_in_flight = self.in_flight

    def answer(self, prompt: str, batch: int, count: int) -> tuple[int, dict[str, str], bytes]:
        """Status, headers and body of one call (runs on the server's request thread)."""
        with self._lock:
            self.calls[(prompt, batch)] = self.calls.get((prompt, batch), 0) + 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            fault = self._take_fault(prompt, batch)
        try:
            delay = self.latency_s + (fault.seconds if fault and fault.kind == "slow" else 0)
            time.sleep(fault.seconds if fault and fault.kind == "timeout" else delay)
            if fault is not None and fault.kind == "500":
                return 500, {}, b"upstream model crashed"
            if fault is not None and fault.kind == "429":
                return 429, {"Retry-After": str(self.retry_after_s)}, b"slow down"
            if fault is not None and fault.kind == "reject":
                return 422, {}, b"prompt rejected by the content policy"
            return 200, {"Content-Type": "text/plain"}, _personas(prompt, batch, count)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _take_fault(self, prompt: str, batch: int) -> Fault | None:
        fault = self._faults.get((prompt, batch))
        if fault is None:
            return None
        fault.times -= 1
        if fault.times <= 0:
            del self._faults[(prompt, batch)]
        return fault


def _personas(prompt: str, batch: int, count: int) -> bytes:
    lines = []
    for i in range(count):
        n = batch * 20 + i
        first, last = FIRST_NAMES[n % len(FIRST_NAMES)], LAST_NAMES[n % len(LAST_NAMES)]
        persona: dict[str, Any] = {
            "firstname": first,
            "lastname": last,
            "gender": "female" if n % 2 else "male",
        }
        persona |= {f"bio_{p}": f"{first} on {p}: {prompt}" for p in PLATFORMS}
        lines.append(json.dumps(persona))
    return "\n".join(lines).encode()


def _handler(api: FakeAvatarApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            try:
                body = json.loads(self.rfile.read(length))
                prompt, batch, count = str(body["prompt"]), int(body["batch"]), int(body["count"])
            except (ValueError, KeyError, TypeError) as exc:
                self._send(400, {}, f"bad request: {exc}".encode())
                return
            self._send(*api.answer(prompt, batch, count))

        def _send(self, status: int, headers: dict[str, str], body: bytes) -> None:
            # a client that timed out has gone: its answer has nowhere to go
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: the demo prints its own summary."""

    return Handler


if __name__ == "__main__":  # python -m examples.avatar_generator.fake_api 8089
    import sys

    api = FakeAvatarApi(latency_s=2.0, port=int(sys.argv[1]) if len(sys.argv) > 1 else 8089)
    print(f"fake persona API at {api.url} (Ctrl-C to stop)")
    api.start()
    with contextlib.suppress(KeyboardInterrupt):
        threading.Event().wait()
