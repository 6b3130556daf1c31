"""One event subscriber process for the conformance suite: ``python -m <package>.subscriber_main
READY OUT COUNT`` subscribes to ``apps:app``'s events, writes READY once it listens, and
writes every event it receives to OUT (JSON lines) until COUNT jobs have finished."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import msgspec

from taskmill.events import subscribe

from .apps import app


async def collect(ready: Path, out: Path, count: int) -> None:
    listening = asyncio.Event()

    async def mark_ready() -> None:
        await listening.wait()
        await asyncio.to_thread(ready.write_text, "listening")

    marker = asyncio.ensure_future(mark_ready())
    finished: set[str] = set()
    with out.open("wb") as sink:
        async for event in subscribe(app, ready=listening):
            sink.write(msgspec.json.encode(event) + b"\n")
            if event.finished:
                finished.add(event.job_id)
                if len(finished) >= count:
                    break
    marker.cancel()


def main(argv: list[str]) -> int:
    ready, out, count = Path(argv[0]), Path(argv[1]), int(argv[2])
    try:
        asyncio.run(collect(ready, out, count))
    finally:
        app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
