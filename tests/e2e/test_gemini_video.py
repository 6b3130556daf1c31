"""``examples/gemini_video`` end to end: the fleet started by the example's own launcher
(``python -m examples.gemini_video workers``: every pool from one ``taskmill worker`` command,
and the dashboard with a login) on the session's real Redis, driven through the example's
client, the ``taskmill`` CLI in subprocesses and the dashboard over HTTP. The fake Gemini runs
in this process, so each test scripts its failures.

The jobs are read back with a plain ``App`` on the same URL (the admin API), to assert on
what the example's surface did."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from examples.gemini_video.fleet import POOLS, WORKER_NAME, pool_of
from examples.gemini_video.gemini import FakeBehaviour, FakeGemini

from servers import RedisServer, free_port
from taskmill import App, JobState
from taskmill.job import Job
from taskmill.testing import wait_until

ROOT = Path(__file__).resolve().parents[2]


APP = "examples.gemini_video.app:app"
TASKS = "examples.gemini_video.app."
LEASE_S = "3"
TIME_SCALE = "0.005"  # caption's 15 min limit becomes 4.5 s, render's hour 18 s


@dataclass
class Fleet:
    url: str
    env: dict[str, str]
    dashboard: str
    password: str
    app: App
    gemini: FakeGemini
    log: Path

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A command of the example (``gemini-video ...``) or of taskmill, to completion."""
        head = (
            ["-m", "examples.gemini_video", *argv[1:]]
            if argv[0] == "gemini-video"
            else ["-m", "taskmill", *argv]
        )
        done = subprocess.run(
            [sys.executable, *head],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=45,
        )
        if check:
            assert done.returncode == 0, f"{argv} exited {done.returncode}:\n{done.stderr}"
        return done

    def wait_job(self, job_id: str, state: JobState, timeout: float = 30.0) -> Job:
        def reached() -> Job | None:
            job = self.app.get_job(job_id)
            assert not job.state.finished or job.state is state, (
                f"{job.task} ended {job.state.value}, not {state.value}: {job.error}"
            )
            return job if job.state is state else None

        return wait_until(reached, timeout=timeout, interval=0.1, what=f"{job_id} {state.value}")

    def client(self, *, login: bool = True) -> httpx.Client:
        auth = ("ops", self.password) if login else None
        return httpx.Client(base_url=self.dashboard, auth=auth, timeout=10)


@pytest.fixture(scope="module")
def fleet(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with contextlib.ExitStack() as stack:  # what started is stopped, whatever fails after
        gemini = FakeGemini(FakeBehaviour(latency_s=(0.005, 0.02), hang_s=10)).start()
        stack.callback(gemini.stop)
        url = f"{redis_server.url}?prefix=gv-e2e-{uuid.uuid4().hex[:8]}:"
        port, password = free_port(), secrets.token_urlsafe(12)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TASKMILL_", "GEMINI_"))}
        env |= {
            "GEMINI_VIDEO_URL": url,
            "GEMINI_API_URL": gemini.url,
            "GEMINI_VIDEO_LEASE_S": LEASE_S,
            "GEMINI_VIDEO_TIME_SCALE": TIME_SCALE,
            "GEMINI_VIDEO_DASHBOARD_PASSWORD": password,
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
        }
        log = tmp_path_factory.mktemp("gemini-video") / "fleet.log"
        argv = [sys.executable, "-m", "examples.gemini_video", "workers", "--dashboard-port",
                str(port)]  # fmt: skip
        with log.open("wb") as out:
            launcher = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its children too: the teardown reaches them all
            )
        stack.callback(_stop_fleet, launcher)
        app = App(url)
        stack.callback(app.close)
        fleet = Fleet(url, env, f"http://127.0.0.1:{port}", password, app, gemini, log)

        def ready() -> bool:
            assert launcher.poll() is None, f"the launcher exited:\n{log.read_text()}"
            return "fleet ready" in log.read_text()

        wait_until(ready, timeout=60, interval=0.2, what=lambda: f"the fleet:\n{log.read_text()}")
        wait_until(lambda: _answers(f"{fleet.dashboard}/health"), timeout=30, what="the dashboard")
        yield fleet


def _stop_fleet(launcher: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the pools drain, 10 s at most), then SIGKILL to whatever did not end."""
    launcher.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        launcher.wait(25)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait(10)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _pools_by_worker(fleet: Fleet) -> dict[str, str]:
    return {w.id: pool_of(w.queues) for w in fleet.app.workers()}


@pytest.mark.timeout(120)  # the module's fixture starts the fleet in this test's time
def test_one_command_starts_every_pool_and_each_queue_runs_in_its_pool(fleet: Fleet) -> None:
    workers = json.loads(fleet.run("workers", "--json", "--url", fleet.url).stdout)
    alive = [w for w in workers if w["status"] == "alive" and w["name"] == WORKER_NAME]
    assert sorted((sorted(w["queues"]), w["concurrency"]) for w in alive) == sorted(
        (sorted(p.queues), p.concurrency) for p in POOLS
    )
    assert len({w["pid"] for w in alive}) == len(POOLS)

    sent = [json.loads(line) for line in fleet.run("gemini-video", "workload").stdout.splitlines()]
    assert {job["queue"] for job in sent} == {
        "render_queue", "preview_queue", "transcode_queue", "caption_queue",
        "hubspot-webhook-events",
    }  # fmt: skip
    jobs = [fleet.wait_job(job["id"], JobState.SUCCEEDED) for job in sent]
    pools = _pools_by_worker(fleet)
    ran_in = {job.queue: pools[job.worker_id or ""] for job in jobs}
    assert ran_in == {
        "render_queue": "render",
        "preview_queue": "preview",
        "transcode_queue": "transcode",
        "caption_queue": "caption",
        "hubspot-webhook-events": "ml",
    }


@pytest.mark.timeout(60)
def test_four_schedules_and_one_fired_through_the_dashboard(fleet: Fleet) -> None:
    listed = json.loads(fleet.run("schedules", "--json", "--app", APP).stdout)
    assert {s["name"]: s["when"] for s in listed} == {
        "monitor-resources": "every 0:01:00",
        "monitor-fatigue": "every 6:00:00",
        "auto-index-winners": "every 12:00:00",
        "cleanup-temp-files": "cron 0 2 * * * (America/New_York)",
    }
    with fleet.client() as dashboard:
        reply = dashboard.post("/api/v1/schedules/auto-index-winners/trigger")
    assert reply.status_code == 201, reply.text
    job = fleet.wait_job(reply.json()["id"], JobState.SUCCEEDED)
    assert job.task == TASKS + "auto_index_winners"
    assert _pools_by_worker(fleet)[job.worker_id or ""] == "ml"
    assert fleet.app.job(job.id).result(timeout=5)["indexed"][0]["ad"] == "ad-1"


@pytest.mark.timeout(60)
def test_a_caption_over_its_time_limit_ends_timed_out(fleet: Fleet) -> None:
    args = json.dumps(["keynote-3h", 3 * 3600])
    enqueued = fleet.run("enqueue", TASKS + "generate_captions", args, "--app", APP)
    job = fleet.wait_job(enqueued.stdout.strip(), JobState.FAILED)
    assert job.error is not None and job.error.type.endswith("TaskTimeoutError"), job.error
    assert job.attempt == 1 + job.lost_leases  # a time limit is not retried
    assert job.started_at and job.finished_at
    assert 4.5 <= job.finished_at - job.started_at < 15  # 900 s scaled by 0.005


@pytest.mark.timeout(60)
def test_render_progress_reaches_the_client_live(fleet: Fleet) -> None:
    fleet.gemini.slow("p-progress", 0.25)  # each scene takes a quarter second
    out = fleet.run("gemini-video", "render", "p-progress", "--scenes", "4", "--watch").stdout
    job_id, *lines = out.splitlines()
    progress = [line for line in lines if "% " in line and "scene" in line]
    assert len(progress) >= 2, out  # several reports, as they happened
    assert "100.0%" in progress[-1] and "scene 4/4 rendered" in progress[-1], out
    assert any(" succeeded " in line for line in lines), out
    assert lines[-1] == f"{job_id}  result 'renders/p-progress.mp4'"


@pytest.mark.timeout(60)
def test_ping_inspect_and_purge_from_the_cli(fleet: Fleet) -> None:
    ping = fleet.run("ping", "--name", WORKER_NAME, "--url", fleet.url)
    alive = re.match(r"ok: (\d+) of \d+ worker\(s\) named gemini-video alive", ping.stdout)
    assert alive and int(alive[1]) >= len(POOLS), ping.stdout
    nobody = fleet.run("ping", "--name", "render2", "--url", fleet.url, check=False)
    assert nobody.returncode == 1 and "render2" in nobody.stderr

    table = fleet.run("workers", "--url", fleet.url).stdout
    assert all(queue in table for pool in POOLS for queue in pool.queues), table

    fleet.run("queues", "pause", "caption_queue", "--url", fleet.url)
    try:
        waiting = [
            fleet.app.send_task(TASKS + "generate_captions", (f"v-{n}", 60.0), external=True,
                                queue="caption_queue").id
            for n in range(3)
        ]  # fmt: skip
        purge = fleet.run("purge", "caption_queue", "--yes", "--url", fleet.url)
        assert purge.stdout.strip() == "purged 3 job(s) from queue caption_queue"
        left = fleet.app.list_jobs(queue="caption_queue", state=["queued", "scheduled"])
        assert not {j.id for j in left.jobs} & set(waiting)
    finally:
        fleet.run("queues", "resume", "caption_queue", "--url", fleet.url)


@pytest.mark.timeout(60)
def test_the_dashboard_needs_its_login(fleet: Fleet) -> None:
    with fleet.client(login=False) as anonymous:
        refused = anonymous.get("/")
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"].startswith("Basic")
        wrong = anonymous.get("/api/v1/workers", auth=("ops", "not-the-password"))
        assert wrong.status_code == 401
    with fleet.client() as dashboard:
        overview = dashboard.get("/")
        assert overview.status_code == 200
        assert "render_queue" in overview.text and "hubspot-webhook-events" in overview.text
        workers = dashboard.get("/api/v1/workers").json()
    assert {pool_of(w["queues"]) for w in workers} >= {p.name for p in POOLS}


@pytest.mark.timeout(60)
def test_gemini_failures_are_retried_until_the_render_succeeds(fleet: Fleet) -> None:
    fleet.gemini.script("p-flaky", ["429", "500", "timeout"])
    job_id = fleet.run("gemini-video", "render", "p-flaky", "--scenes", "2").stdout.strip()
    job = fleet.wait_job(job_id, JobState.SUCCEEDED, timeout=40)
    assert job.attempt == 4 + job.lost_leases  # 429, 500, no answer, then the scenes
    assert fleet.gemini.pending_faults("p-flaky") == 0


@pytest.mark.timeout(60)
def test_a_render_gemini_keeps_failing_ends_failed_and_is_retried_from_the_dashboard(
    fleet: Fleet,
) -> None:
    fleet.gemini.outage("p-down", True)
    job_id = fleet.run("gemini-video", "render", "p-down", "--scenes", "1").stdout.strip()
    job = fleet.wait_job(job_id, JobState.FAILED, timeout=40)
    assert job.attempt == 4 + job.lost_leases and job.error is not None
    assert job.error.type.endswith("GeminiTransientError") and "500" in job.error.message

    failed = json.loads(fleet.run("jobs", "list", "--state", "failed", "--json", "--url",
                                  fleet.url).stdout)  # fmt: skip
    assert job_id in {j["id"] for j in failed["jobs"]}
    fleet.gemini.outage("p-down", False)  # Gemini is back
    with fleet.client() as dashboard:
        page = dashboard.get("/job", params={"id": job_id})
        assert page.status_code == 200 and "GeminiTransientError" in page.text
        retried = dashboard.post(f"/api/v1/jobs/{job_id}/retry")
    assert retried.status_code == 200, retried.text
    assert fleet.wait_job(job_id, JobState.SUCCEEDED).attempt == 1


@pytest.mark.timeout(60)
def test_a_render_worker_killed_mid_job_its_render_completes(fleet: Fleet) -> None:
    fleet.gemini.slow("p-kill", 0.4)  # eight scenes: over three seconds of work
    job_id = fleet.run("gemini-video", "render", "p-kill", "--scenes", "8").stdout.strip()

    def running_with_progress() -> Job | None:
        job = fleet.app.get_job(job_id)
        return job if job.state is JobState.RUNNING and job.progress else None

    victim = wait_until(running_with_progress, timeout=30, what="the render to make progress")
    pid = next(w.pid for w in fleet.app.workers() if w.id == victim.worker_id)
    os.kill(pid, signal.SIGKILL)

    job = fleet.wait_job(job_id, JobState.SUCCEEDED, timeout=40)
    assert job.lost_leases >= 1 and job.worker_id != victim.worker_id
    assert fleet.app.job(job_id).result(timeout=5) == "renders/p-kill.mp4"
    render = [w for w in fleet.app.workers() if pool_of(w.queues) == "render" and not w.lost]
    assert any(w.pid != pid for w in render), "the supervisor restarts the killed process"
