"""What a client of the fleet does: send work, and follow a job's progress live.

The seed's client polled ``GET task_status:ID`` or ran ``SUBSCRIBE task_progress:ID`` on a
channel the task published to by hand; here the worker publishes every transition and
``progress()`` report (``App(events=True)``) and ``JobHandle.watch()`` follows them.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

from taskmill import App, JobHandle


def progress_lines(handle: JobHandle[Any]) -> Iterator[str]:
    """One line per event of the job, until it finishes."""
    for event in handle.watch():
        pct = f"{event.progress * 100:5.1f}%" if event.progress is not None else "     -"
        note = event.message or ""
        yield f"{handle.id}  {event.state:<9} {pct}  attempt {event.attempt}  {note}".rstrip()


def follow(app: App, job_id: str, echo: Callable[[str], None]) -> int:
    """Print the job's progress until it finishes; 0 if it succeeded."""
    handle = app.job(job_id)
    for line in progress_lines(handle):
        echo(line)
    job = handle.info()
    if job.state.value == "succeeded":
        echo(f"{job_id}  result {handle.result(timeout=5)!r}")
        return 0
    echo(f"{job_id}  {job.state.value}: {job.error.message if job.error else ''}")
    return 1


def send_workload(scale: int, rng: random.Random | None = None) -> list[JobHandle[Any]]:
    """The demo's mix across every pool, ``scale`` of each kind (renders and previews more)."""
    from examples.gemini_video import app as tasks

    rng = rng or random.Random(4)
    handles: list[JobHandle[Any]] = []
    for n in range(scale):
        handles.append(tasks.render_video.send(f"campaign-{n}", rng.randint(2, 4)))
        handles += [tasks.generate_preview.send(f"video-{n}-{i}", 4) for i in range(2)]
        handles.append(tasks.transcode.send(f"video-{n}", rng.choice(["h264", "vp9", "av1"])))
        handles.append(tasks.generate_captions.send(f"video-{n}", 60.0))
        deal = {"dealId": f"deal-{n}", "stageTo": "closedwon", "dealValue": 1000 * (n + 1)}
        handles.append(tasks.process_hubspot_webhook.send(deal))
    return handles
