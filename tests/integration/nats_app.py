"""The app that ``taskmill worker`` processes load in the NATS tests (``nats_app:app``).

The URL comes from ``TASKMILL_URL`` (a test's own server and prefix). Leases are short so
a job whose worker lost it comes back within seconds; task names are explicit so the test's
in-process app and the worker agree on them.
"""

from __future__ import annotations

import os
import time

from taskmill import App

SETTINGS = {"lease_s": 3.0, "heartbeat_s": 0.3, "recover_interval_s": 0.3}

app = App(os.environ.get("TASKMILL_URL", "memory://"), **SETTINGS)


@app.task(name="work", retries=5, backoff=0.05)
def work(n: int, pause_s: float = 0.0) -> int:
    if pause_s:
        time.sleep(pause_s)
    return n
