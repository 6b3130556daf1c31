"""The demo's app: an online shop's background work, on one SQLite file.

``python -m examples.demo`` (``make demo``) sends the jobs; the worker processes it starts import
this module as ``examples.demo.app:app``. The database is ``TASKMILL_DEMO_DB`` if set, else
``taskmill-demo/demo.db`` in the temp directory (the demo deletes it before it starts).
"""

from __future__ import annotations

import asyncio
import os
import random
import tempfile
import time

from taskmill import App, Backoff, current_job

DB_PATH = os.path.abspath(
    os.environ.get("TASKMILL_DEMO_DB")
    or os.path.join(tempfile.gettempdir(), "taskmill-demo", "demo.db")
)
app = App(f"sqlite:///{DB_PATH}")

# short back-off so that retries happen while you watch
QUICK_RETRY = Backoff(base=0.2, cap=1.0)


class CardDeclinedError(Exception):
    """The bank said no: retrying cannot help."""


@app.task(queue="urgent", priority=10, retries=3, backoff=QUICK_RETRY)
def send_receipt(order_id: int) -> str:
    """A mail server that drops about one first attempt in four; the retry gets through."""
    time.sleep(random.uniform(0.01, 0.03))
    if current_job().attempt == 1 and random.random() < 0.25:
        raise ConnectionError("SMTP server closed the connection")
    return f"receipt for order {order_id} sent"


@app.task(
    queue="urgent", priority=5, retries=2, backoff=QUICK_RETRY, dont_retry_on=CardDeclinedError
)
def charge_card(order_id: int, cents: int) -> str:
    """Every 20th card is declined: the job fails at once, without retries."""
    time.sleep(random.uniform(0.02, 0.05))
    if order_id % 20 == 0:
        raise CardDeclinedError(f"card declined for order {order_id}")
    return f"charged {cents} cents for order {order_id}"


@app.task(queue="default", retries=2, backoff=QUICK_RETRY)
def resize_image(image_id: int, sizes: int) -> list[str]:
    """Slow-ish work that reports its progress after each size."""
    job = current_job()
    done = []
    for i in range(sizes):
        time.sleep(random.uniform(0.03, 0.08))
        done.append(f"img{image_id}-{i}.jpg")
        job.progress((i + 1) / sizes, f"size {i + 1} of {sizes}")
    return done


@app.task(queue="default", retries=4, backoff=QUICK_RETRY)
async def sync_inventory(sku: str) -> int:
    """An async task against a flaky upstream: any attempt but the last may time out."""
    job = current_job()
    await asyncio.sleep(random.uniform(0.02, 0.1))
    if job.attempt < job.max_attempts and random.random() < 0.3:
        raise TimeoutError(f"warehouse API timed out for {sku}")
    return len(sku)


@app.task(queue="default", retries=1, backoff=QUICK_RETRY)
def build_report(day: int) -> None:
    """Always fails (a bug): the failed jobs stay inspectable and retryable by hand."""
    time.sleep(0.01)
    raise KeyError(f"no column 'revenue' in the sales of day {day}")
