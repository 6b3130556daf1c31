"""What every process of the example reads from its environment (``__main__`` sets it for
the processes it starts)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from examples._support.env import env_seconds

DEFAULT_DB = str(Path(os.environ.get("TMPDIR", "/tmp")) / "task_tracker" / "messages.db")


@dataclass(frozen=True)
class Settings:
    broker_url: str
    """``TASKMILL_URL``: the NATS server (``nats://host:4222``), or any taskmill URL."""
    model_url: str
    """``TASK_TRACKER_MODEL_URL``: the scoring model service."""
    db_path: str
    """``TASK_TRACKER_DB``: the SQLite file of the messages (the app's own data)."""
    lease_s: float
    """``TASK_TRACKER_LEASE_S``: how long a worker's claim lasts without a heartbeat."""
    model_timeout_s: float
    """``TASK_TRACKER_MODEL_TIMEOUT_S``: one call to the model, at most."""
    signal_threshold: float = 0.7
    """A message scoring at least this is signal (the seed's noise classification), and only
    then is its knowledge extracted."""

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        return cls(
            broker_url=env.get("TASKMILL_URL", "nats://127.0.0.1:4222"),
            model_url=env.get("TASK_TRACKER_MODEL_URL", "http://127.0.0.1:8766"),
            db_path=env.get("TASK_TRACKER_DB", DEFAULT_DB),
            lease_s=env_seconds(env, "TASK_TRACKER_LEASE_S", 30.0),
            model_timeout_s=env_seconds(env, "TASK_TRACKER_MODEL_TIMEOUT_S", 5.0),
        )


def classify(score: float, threshold: float) -> str:
    """The seed's noise classification: noise below 0.3, weak signal below the threshold."""
    if score < 0.3:
        return "noise"
    return "weak_signal" if score < threshold else "signal"
