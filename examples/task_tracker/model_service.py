"""A fake scoring model: a small local HTTP service standing in for the seed's LLM and scoring
providers, with latency and injected errors, so retries and failures really happen.

- ``POST /score`` ``{"text": ...}`` → ``{"score": 0..1, "factors": {...}}``
- ``POST /extract`` ``{"text": ...}`` → ``{"topics": [...]}``
- ``POST /faults`` ``{"match": "text", "status": 500|429|422|..., "times": n, "delay_s": s,
  "retry_after_s": s}``: the next ``n`` calls (``-1``: every one) whose text contains
  ``match`` wait ``delay_s`` and answer ``status`` (a 429 with ``Retry-After``; 200: a
  slow answer, but a right one);
  ``DELETE /faults`` removes them all.
- ``GET /calls``: calls and answers so far, per path and status.

``error_rate`` also fails that share of all calls at random with a 500 or a 429, for the
demo; tests leave it at 0 and script faults instead.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections import Counter
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from examples._support.serving import Served, serve

KEYWORDS = {
    "decision": "decision", "decided": "decision", "deadline": "deadline", "release": "release",
    "incident": "incident", "outage": "incident", "bug": "bug", "customer": "customer",
    "budget": "budget", "launch": "release", "migrate": "migration", "security": "security",
}  # fmt: skip
"""Words that make a message matter, and the topic each stands for."""


@dataclass
class Fault:
    match: str
    status: int
    times: int
    delay_s: float = 0.0
    retry_after_s: float = 1.0


@dataclass
class ModelState:
    latency_s: tuple[float, float] = (0.02, 0.08)
    error_rate: float = 0.0
    faults: list[Fault] = field(default_factory=list)
    calls: Counter[str] = field(default_factory=Counter)
    rng: random.Random = field(default_factory=lambda: random.Random(1))


def score_text(text: str) -> tuple[float, dict[str, float]]:
    """A deterministic importance score: matter words, then length."""
    words = re.findall(r"[a-z]+", text.lower())
    hits = {KEYWORDS[w] for w in words if w in KEYWORDS}
    factors = {
        "content": round(min(0.9, 0.3 * len(hits)), 2),
        "length": round(min(0.1, len(words) / 200), 2),
    }
    return round(min(1.0, 0.05 + sum(factors.values())), 2), factors


def topics_of(text: str) -> list[str]:
    words = re.findall(r"[a-z]+", text.lower())
    return sorted({KEYWORDS[w] for w in words if w in KEYWORDS})


def build(state: ModelState) -> Starlette:
    site = Starlette(
        routes=[
            Route("/score", score, methods=["POST"]),
            Route("/extract", extract, methods=["POST"]),
            Route("/faults", faults, methods=["POST", "DELETE"]),
            Route("/calls", calls),
        ]
    )
    site.state.model = state
    return site


async def score(request: Request) -> Response:
    text, failed = await answer(request, "/score")
    if failed is not None:
        return failed
    value, factors = score_text(text)
    return JSONResponse({"score": value, "factors": factors})


async def extract(request: Request) -> Response:
    text, failed = await answer(request, "/extract")
    if failed is not None:
        return failed
    return JSONResponse({"topics": topics_of(text)})


async def faults(request: Request) -> Response:
    state: ModelState = request.app.state.model
    if request.method == "DELETE":
        state.faults.clear()
        return JSONResponse({"faults": 0})
    state.faults.append(Fault(**(await request.json())))
    return JSONResponse({"faults": len(state.faults)})


async def calls(request: Request) -> Response:
    state: ModelState = request.app.state.model
    return JSONResponse(dict(state.calls))


async def answer(request: Request, path: str) -> tuple[str, Response | None]:
    """The call's text after the model's latency, or the error response it gets."""
    state: ModelState = request.app.state.model
    body = await request.json()
    text = body.get("text") if isinstance(body, dict) else None
    if not isinstance(text, str):
        return "", JSONResponse({"error": "give {'text': ...}"}, 400)
    await asyncio.sleep(state.rng.uniform(*state.latency_s))
    failed = await injected(state, text)
    status = 200 if failed is None else failed.status_code
    state.calls[f"{path} {status}"] += 1
    return text, failed


async def injected(state: ModelState, text: str) -> Response | None:
    """The error this call gets, if a fault or the random error rate says so."""
    for fault in state.faults:
        if fault.times != 0 and fault.match in text:
            if fault.times > 0:
                fault.times -= 1
            await asyncio.sleep(fault.delay_s)
            return None if fault.status == 200 else _error(fault.status, fault.retry_after_s)
    if state.error_rate and state.rng.random() < state.error_rate:
        return _error(state.rng.choice([500, 429]), 1.0)
    return None


def _error(status: int, retry_after_s: float) -> Response:
    headers = {"Retry-After": f"{retry_after_s:g}"} if status == 429 else None
    reason = {429: "rate limited", 422: "cannot score this text"}.get(status, "model error")
    return JSONResponse({"error": reason}, status, headers=headers)


class ModelService:
    """The fake model served by uvicorn on a loopback port, on a thread of this process."""

    def __init__(self, state: ModelState | None = None, port: int = 0) -> None:
        self.state = state or ModelState()
        self.port = port
        self.served: Served | None = None

    @property
    def url(self) -> str:
        assert self.served is not None, "start() the fake model first"
        return self.served.url

    def start(self) -> ModelService:
        # a call still waiting on its injected delay must not hold the shutdown: 1 s of grace
        self.served = serve(build(self.state), port=self.port, lifespan="off", grace_s=1)
        return self

    def stop(self) -> None:
        if self.served is not None:
            self.served.stop()

    def __enter__(self) -> ModelService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
