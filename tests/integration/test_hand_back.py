"""The hand-back of jobs a dead worker process held and had not begun, when the broker cannot
take it: logged, and the worker starts all the same (the jobs come back through recovery, as
without it). The hand-back that works is in tests/conformance/test_processes.py, on every
broker; the table it reads in tests/unit/test_holdings.py."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from servers import RedisServer
from taskmill import App
from taskmill.job import Claim
from taskmill.worker.holdings import Holdings, left_idle, take_over

pytestmark = pytest.mark.timeout(60)


def test_a_hand_back_the_broker_cannot_take_is_logged_and_the_worker_goes_on(
    redis_server_aof: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = str(tmp_path / "slot-0")
    Holdings(path, 2).hold(Claim("job-1", "token-1"))  # the dead process's table, never closed
    app = App(f"{redis_server_aof.url}?prefix=handback")
    try:
        app.open()
        broker = app.broker
        redis_server_aof.stop()
        with caplog.at_level(logging.WARNING, logger="taskmill.worker"):
            table = app.run_sync(take_over(broker, path, 4, worker_id="w-next"))
        assert "w-next: could not hand back the 1 job(s)" in caplog.text
        assert left_idle(path) == []  # the table is the new process's now
        table.close()
    finally:
        app.close()
