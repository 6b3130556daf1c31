"""Opening the broker when a worker starts, retrying one that cannot be reached yet.

A worker is often started beside its broker (a deploy, a compose file): a broker that does not
answer yet (``BrokerUnavailableError``) is retried, logged at WARNING each time, after 0.5 s
doubling up to 30 s, for ever or until ``max_wait_s``. Any other error is raised: a read-only
file or a refused login does not get better by waiting.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from taskmill.errors import BrokerUnavailableError

if TYPE_CHECKING:
    from taskmill.brokers.base import Broker
    from taskmill.client import Client
    from taskmill.worker.stopping import Stop

log = logging.getLogger("taskmill.worker")

RETRY_FIRST_S = 0.5
RETRY_CAP_S = 30.0

__all__ = ["open_broker"]


async def open_broker(
    client: Client, stop: Stop, *, max_wait_s: float | None, worker_id: str
) -> Broker | None:
    """The client's broker, opened; ``None`` if the worker is stopped while it waits."""
    deadline = None if max_wait_s is None else time.monotonic() + max_wait_s
    delay = RETRY_FIRST_S
    while True:
        try:
            return await client.abroker()
        except BrokerUnavailableError as exc:
            if stop.is_set():
                return None
            if deadline is not None and time.monotonic() + delay > deadline:
                raise BrokerUnavailableError(
                    f"gave up reaching the broker after {max_wait_s:g} s: {exc}"
                ) from exc
            log.warning(
                "worker %s: cannot reach the broker at start, retrying in %.1f s: %s",
                worker_id,
                delay,
                exc,
            )
        await stop.sleep(delay)
        if stop.is_set():
            return None
        delay = min(delay * 2, RETRY_CAP_S)
