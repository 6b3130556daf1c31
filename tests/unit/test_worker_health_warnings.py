"""A worker asks its broker for ``health_warnings`` with its maintenance: each warning is
logged once while it lasts (and its end at INFO), and shown by the liveness status."""

from __future__ import annotations

import logging

import pytest

from taskmill import App
from taskmill.testing import running_worker, wait_until
from taskmill.worker import maintenance as worker_module
from taskmill.worker.process import worker_health


def test_a_broker_warning_is_logged_once_while_it_lasts_and_shown_by_the_status(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(worker_module, "HEALTH_CHECK_S", 0.01)
    app = App("memory://", lease_s=0.2)  # maintenance every ~0.1 s
    app.open()
    current: dict[str, str] = {}
    asked: list[int] = []

    async def health_warnings() -> dict[str, str]:
        asked.append(1)
        return dict(current)

    monkeypatch.setattr(app.broker, "health_warnings", health_warnings)
    caplog.set_level(logging.INFO, logger="taskmill.worker")
    try:
        with running_worker(app, register=True) as w:
            status = worker_health(w)
            wait_until(lambda: len(asked) >= 2, what="two checks")
            assert "warnings" not in status()[1]
            current["pinned_snapshot"] = "a transaction has held a snapshot for 31 s"
            wait_until(lambda: w.broker_warnings, what="the warning")
            seen = len(asked)
            wait_until(lambda: len(asked) >= seen + 3, what="three more checks")
            healthy, details = status()
            assert healthy
            assert details["warnings"] == {"pinned_snapshot": current["pinned_snapshot"]}
            current.clear()
            wait_until(lambda: not w.broker_warnings, what="the warning to end")
            assert "warnings" not in status()[1]
    finally:
        app.close()
    warned = [r for r in caplog.records if "broker warning (pinned_snapshot):" in r.message]
    over = [r for r in caplog.records if "broker warning (pinned_snapshot) is over" in r.message]
    assert [r.levelno for r in warned] == [logging.WARNING]
    assert "held a snapshot for 31 s" in warned[0].message
    assert [r.levelno for r in over] == [logging.INFO]
