"""What the progress bar of ``enqueue --wait`` and ``jobs watch`` shows."""

from __future__ import annotations

from taskmill.cli.enqueue import bar_fields
from taskmill.events import Event


def _event(state: str, progress: float | None = None, message: str | None = None) -> Event:
    return Event("j1", "app.render", "default", state, 1, 0.0, 1, progress, message)


def test_a_transition_keeps_the_last_reported_progress() -> None:
    assert bar_fields(_event("running", 0.75, "step 3"), None) == (
        "app.render running",
        0.75,
        "step 3",
    )
    assert bar_fields(_event("failed"), 0.75) == ("app.render failed", 0.75, "")


def test_a_succeeded_job_shows_a_full_bar() -> None:
    # was "succeeded 0 %": the ended event carries no progress
    assert bar_fields(_event("succeeded"), None)[1] == 1.0
    assert bar_fields(_event("succeeded"), 0.5)[1] == 1.0


def test_a_job_that_never_reported_has_no_fraction() -> None:
    assert bar_fields(_event("running"), None)[1] is None
