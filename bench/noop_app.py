"""The benchmark's app: no-op tasks, so what is measured is taskmill's own cost."""

from __future__ import annotations

import os

from taskmill import App

app = App(os.environ.get("TASKMILL_URL", "sqlite:///bench.db"))


@app.task(name="noop", retries=0)
def noop() -> None:
    """A sync no-op: runs in the worker's thread pool (the default pool)."""


@app.task(name="anoop", retries=0)
async def anoop() -> None:
    """An async no-op: runs on the worker's event loop."""


@app.task(name="add", retries=0)
def add(a: int, b: int) -> int:
    """A sync task with annotated arguments and result: what converting them costs."""
    return a + b


@app.task(name="text", retries=0)
def text(text: str) -> int:
    """A sync task given a long text (``bench.throughput --task text``): what a long payload
    costs the broker between its send and its finish."""
    return len(text)


@app.task(name="fail", retries=0)
def fail() -> None:
    """A sync task that raises from a few frames down: what a failure costs (its stored error
    and traceback), with no retry."""
    _parse({"rate": "n/a"})


def _parse(row: dict[str, str]) -> float:
    return _to_number(row["rate"]) * 100


def _to_number(text: str) -> float:
    return float(text)
