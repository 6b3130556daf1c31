"""CPU time of one ``send()`` and of encoding its arguments, by shape of payload, in µs.

    python -m bench.send_cost                  # memory and SQLite brokers, every shape
    python -m bench.send_cost --broker sqlite --rounds 7

For each shape of call (no arguments, two ints, a small dict, 100 records, 1,000 ints, a value
with ``None`` and datetimes, a 100 KB string) it times, best of ``--rounds``:

- ``encode``: ``taskmill.serialization.encode_payload`` alone (what every send does first);
- ``send``: a ``task.send(...)`` loop on the broker, the CPU time of this process per send
  (``time.process_time``: a busy machine's waiting is not counted, so runs compare).

For a before/after comparison run it twice back to back, once with the old source first on
``PYTHONPATH`` (``git archive <commit> src | tar -x -C /tmp/old``), and compare the tables.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import taskmill
from taskmill import App
from taskmill.serialization import encode_payload

Call = tuple[tuple[Any, ...], dict[str, Any]]

_WHEN = datetime(2024, 5, 1, 9, 30, tzinfo=UTC)
SHAPES: dict[str, Call] = {
    "noop()": ((), {}),
    "add(1, 2)": ((1, 2), {}),
    "dict of 10": (({f"key{i}": i if i % 2 else f"value {i}" for i in range(10)},), {}),
    "100 records": (
        (
            [
                {"id": i, "name": "x" * 10, "price": 1.5, "ok": True, "tags": ["a", "b"]}
                for i in range(100)
            ],
        ),
        {},
    ),
    "1,000 ints": ((list(range(1000)),), {}),
    "None + datetimes": ((str(uuid.UUID(int=7)), None), {"when": _WHEN, "until": [_WHEN] * 3}),
    "100 KB str": (("a" * 100_000,), {}),
}


def cpu_us(fn: Callable[..., object], n: int, rounds: int) -> float:
    """The CPU time of one call of ``fn``, in µs: best of ``rounds`` runs of ``n`` calls."""
    best = float("inf")
    for _ in range(rounds):
        t0 = time.process_time()
        for _ in range(n):
            fn()
        best = min(best, (time.process_time() - t0) / n)
    return best * 1e6


def measure(url: str, rounds: int, scale: int) -> dict[str, tuple[float, float]]:
    app = App(url, max_payload_bytes=4 << 20)

    @app.task(name="bench.sink", retries=0)
    def sink(*args: Any, **kwargs: Any) -> None:
        return None

    sink.send()  # open the broker, make the schema, outside the timed part
    figures: dict[str, tuple[float, float]] = {}
    for name, (args, kwargs) in SHAPES.items():
        size = len(encode_payload("bench.sink", args, kwargs, 4 << 20))
        n = max(20, scale * 200 // max(1, size // 500 + 1))
        encode = cpu_us(
            lambda a=args, k=kwargs: encode_payload("bench.sink", a, k, 4 << 20), n * 5, rounds
        )
        send = cpu_us(lambda a=args, k=kwargs: sink.send(*a, **k), n, rounds)
        figures[name] = (encode, send)
        if url.startswith("memory"):
            app.client.use_broker(None)  # a fresh broker: the stored jobs do not pile up
            sink.send()
    app.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--broker", choices=["memory", "sqlite", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--scale", type=int, default=5, help="more sends per round")
    args = parser.parse_args()
    brokers = ["memory", "sqlite"] if args.broker == "both" else [args.broker]
    print(f"taskmill from {taskmill.__file__}, python {sys.version.split()[0]}")
    for broker in brokers:
        with tempfile.TemporaryDirectory(prefix="taskmill-bench-") as tmp:
            url = "memory://" if broker == "memory" else f"sqlite:///{tmp}/send.db"
            figures = measure(url, args.rounds, args.scale)
        print(f"\n{broker}: CPU µs, best of {args.rounds}")
        print(f"  {'payload':<18} {'encode':>9} {'send':>9}")
        for name, (encode, send) in figures.items():
            print(f"  {name:<18} {encode:>9.2f} {send:>9.2f}")


if __name__ == "__main__":
    main()
