"""GeminiVideo's background work on taskmill: the ML service's tasks and the video agent's, on
one Redis, each queue served by its own pool (``examples.gemini_video.fleet.POOLS``).

Every process that imports this module (the launcher, the worker pools, the dashboard, the
``render`` client) reads its settings from the environment, which the launcher passes on:

- ``GEMINI_VIDEO_URL``: the broker (default ``redis://127.0.0.1:6379/0?prefix=gemini-video:``);
- ``GEMINI_API_URL``: the Gemini service (default ``http://127.0.0.1:8089``);
- ``GEMINI_VIDEO_LEASE_S``: how long a claim lasts without a heartbeat (default 30);
- ``GEMINI_VIDEO_TIME_SCALE``: the factor applied to the seed's time limits (default 1: render
  1 h, transcode 30 min, caption 15 min, preview 5 min; the demo runs at 0.01);
- ``GEMINI_VIDEO_TZ``: the zone of the daily 02:00 cleanup (default ``America/New_York``);
- ``GEMINI_VIDEO_TEMP_DIR``: what the cleanup sweeps (default ``$TMPDIR/gemini-video``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from examples._support.env import env_seconds
from examples.gemini_video.gemini import GeminiTransientError, generate
from taskmill import App, Backoff, current_job
from taskmill.errors import ConfigurationError

DEFAULT_URL = "redis://127.0.0.1:6379/0?prefix=gemini-video:"


def _seconds(name: str, default: float) -> float:
    return env_seconds(os.environ, name, default, error=ConfigurationError)


GEMINI_URL = os.environ.get("GEMINI_API_URL", "http://127.0.0.1:8089")
TIME_SCALE = env_seconds(
    os.environ,
    "GEMINI_VIDEO_TIME_SCALE",
    1.0,
    error=ConfigurationError,
    unit="times the seed's limits",
)
CLEANUP_TZ = os.environ.get("GEMINI_VIDEO_TZ", "America/New_York")
TEMP_DIR = Path(
    os.environ.get("GEMINI_VIDEO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gemini-video"
)
GEMINI_CALL_TIMEOUT_S = 2.0
"""How long one Gemini call may take before it counts as a transient failure."""

app = App(
    os.environ.get("GEMINI_VIDEO_URL", DEFAULT_URL),
    events=True,  # progress and transitions over Redis pub/sub, for the render client
    lease_s=_seconds("GEMINI_VIDEO_LEASE_S", 30.0),
)

# Gemini's 429s and 500s are retried with back-off; a refused request, a bad codec or a time
# limit is not: the same input would fail the same way.
GEMINI_BACKOFF = Backoff(base=0.5, cap=8.0)


def limit(seed_seconds: float) -> float:
    """The seed's time limit, scaled by ``GEMINI_VIDEO_TIME_SCALE``."""
    return seed_seconds * TIME_SCALE


# --- ML service: queues hubspot-webhook-events, fatigue-monitoring, budget-optimization ------


@app.task(
    queue="hubspot-webhook-events", retries=3, backoff=GEMINI_BACKOFF, dont_retry_on=ValueError
)
async def process_hubspot_webhook(deal: dict[str, Any]) -> dict[str, Any]:
    """A HubSpot deal moved stage: compute the synthetic revenue, attribute it to the ad."""
    missing = [k for k in ("dealId", "stageTo", "dealValue") if k not in deal]
    if missing:
        raise ValueError(f"the webhook's deal lacks {', '.join(missing)}: {sorted(deal)}")
    won = deal["stageTo"] == "closedwon"
    revenue = float(deal["dealValue"]) * (1.0 if won else 0.1)
    await asyncio.sleep(0.02)  # the attribution query
    return {"deal": deal["dealId"], "synthetic_revenue": revenue, "attributed": won}


@app.periodic(every=timedelta(hours=6), name="monitor-fatigue", overlap="skip")
@app.task(
    queue="fatigue-monitoring", retries=3, backoff=GEMINI_BACKOFF, retry_on=GeminiTransientError
)
async def monitor_fatigue() -> dict[str, Any]:
    """Every 6 h: flag ads whose CTR falls while frequency and CPM rise."""
    ads = {"ad-1": (0.031, 2.1), "ad-2": (0.012, 6.8), "ad-3": (0.024, 3.9)}  # CTR, frequency
    fatigued = sorted(ad for ad, (ctr, freq) in ads.items() if ctr < 0.015 or freq > 6)
    return {"checked": len(ads), "fatigued": fatigued}


@app.periodic(every=timedelta(hours=12), name="auto-index-winners", overlap="skip")
@app.task(
    queue="budget-optimization", retries=3, backoff=GEMINI_BACKOFF, retry_on=GeminiTransientError
)
async def auto_index_winners() -> dict[str, Any]:
    """Every 12 h: describe each winning ad with Gemini, ready for the similarity index."""
    indexed = []
    for ad in ("ad-1", "ad-3"):
        text = await generate(
            GEMINI_URL,
            "gemini-2.5-flash",
            f"describe the creative DNA of {ad}",
            project="winners-index",
            timeout_s=GEMINI_CALL_TIMEOUT_S,
        )
        indexed.append({"ad": ad, "chars": len(text)})
    return {"indexed": indexed}


# --- video agent: render_queue, preview_queue, transcode_queue, caption_queue ----------------


@app.task(
    queue="render_queue",
    priority=10,
    timeout=limit(3600),
    retries=3,
    backoff=GEMINI_BACKOFF,
    retry_on=GeminiTransientError,
)
async def render_video(project: str, scenes: int, model: str = "gemini-2.5-flash") -> str:
    """Draft each scene with Gemini, then encode it; progress after every scene."""
    if scenes < 1:
        raise ValueError(f"a render needs at least one scene, not {scenes}")
    job = current_job()
    for scene in range(1, scenes + 1):
        await generate(
            GEMINI_URL,
            model,
            f"storyboard scene {scene} of {scenes} for {project}",
            project=project,
            timeout_s=GEMINI_CALL_TIMEOUT_S,
        )
        await asyncio.sleep(0.05)  # the encoder
        job.progress(scene / scenes, f"scene {scene}/{scenes} rendered")
    return f"renders/{project}.mp4"


@app.task(queue="preview_queue", priority=5, timeout=limit(300))
async def generate_preview(video: str, frames: int = 4) -> list[str]:
    """Extract ``frames`` thumbnails at even intervals."""
    await asyncio.sleep(0.01 * frames)
    return [f"previews/{video}-{i}.jpg" for i in range(frames)]


CODECS = {"h264", "h265", "vp9", "av1"}


@app.task(queue="transcode_queue", priority=7, timeout=limit(1800), dont_retry_on=ValueError)
async def transcode(video: str, codec: str = "h264", container: str = "mp4") -> str:
    """Convert to another codec and container."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; one of {', '.join(sorted(CODECS))}")
    await asyncio.sleep(0.1)
    return f"out/{video}.{codec}.{container}"


@app.task(queue="caption_queue", priority=6, timeout=limit(900), retries=0)
async def generate_captions(video: str, duration_s: float, language: str = "auto") -> str:
    """Speech to SRT subtitles, at 100 times real time: a long video meets the time limit."""
    job = current_job()
    cues = max(1, int(duration_s // 10))
    for cue in range(cues):
        await asyncio.sleep(0.1)  # ten seconds of audio at 100x
        job.progress((cue + 1) / cues, f"cue {cue + 1}/{cues}")
    return f"1\n00:00:00,000 --> 00:00:{min(int(duration_s), 59):02d},000\n[{language}] {video}\n"


# --- maintenance: the video agent's Beat schedules, queue video-maintenance ------------------


@app.periodic(cron="0 2 * * *", tz=CLEANUP_TZ, name="cleanup-temp-files", misfire="once")
@app.task(queue="video-maintenance")
async def cleanup_temp_files(max_age_days: float = 7.0) -> dict[str, int]:
    """Daily at 02:00: delete temporary files older than ``max_age_days``."""
    removed = await asyncio.to_thread(_sweep, TEMP_DIR, time.time() - max_age_days * 86400)
    return {"removed": removed}


def _sweep(directory: Path, cutoff: float) -> int:
    removed = 0
    for path in directory.rglob("*") if directory.is_dir() else ():
        if path.is_file() and path.stat().st_mtime < cutoff:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


@app.periodic(every=60, name="monitor-resources", overlap="skip")
@app.task(queue="video-maintenance", retries=0)
async def monitor_resources() -> dict[str, float]:
    """Every minute: load and disk use; the dashboard shows the result."""
    load1, _, _ = os.getloadavg()
    disk = shutil.disk_usage(tempfile.gettempdir())
    return {"load1": round(load1, 2), "disk_used_pct": round(100 * disk.used / disk.total, 1)}
