"""The persona marketplace (``examples/persona_marketplace``, seed 002) end to end: its FastAPI
app under uvicorn on a loopback port, two real ``taskmill worker --pool process`` processes on
the session's Redis (a key prefix of this module's own), and the fake source and embedding
services. Everything is driven through the app's HTTP API and the dashboard mounted in it.

The workers run with short limits (soft 4 s, hard 6 s) and a 4 s lease, so the time-limit and
killed-worker cases take seconds.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
import redis
from examples._support.processes import stop
from examples._support.serving import Served, serve
from examples.persona_marketplace.config import Config
from examples.persona_marketplace.fakes import CHUNKS_PER_DOCUMENT, CORPUS_SIZE, FakeServices
from examples.persona_marketplace.serving import start_worker
from examples.persona_marketplace.tasks import build
from examples.persona_marketplace.web import create_api

from servers import RedisServer
from taskmill.testing import wait_until
from taskmill.web import WebConfig

ROOT = Path(__file__).resolve().parents[2]


PASSWORD = "a long dashboard secret"
AUTH = ("ops", PASSWORD)
SOURCES = ("profile", "works", "quotes")
FINISHED = {"completed", "failed"}
WAIT_S = 30.0


@dataclass
class Market:
    api: httpx.Client
    services: FakeServices
    workers: dict[str, tuple[Any, Path]]
    """worker name -> (its Popen, its log file)"""

    def logs(self) -> str:
        return "\n".join(
            f"--- {name}\n{log.read_text()}" for name, (_, log) in self.workers.items()
        )

    def ingest(self, persona: str) -> dict[str, Any]:
        response = self.api.post(f"/api/personas/{persona}/ingest")
        assert response.status_code == 202, response.text
        body: dict[str, Any] = response.json()
        assert set(body["jobs"]) == set(SOURCES)
        return body

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.api.get(f"/api/jobs/{job_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def wait_job(self, job_id: str, status: str, timeout: float = WAIT_S) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            self._check_workers()
            row = self.api.get(f"/api/jobs/{job_id}")
            return row.json() if row.status_code == 200 and row.json()["status"] == status else None

        def state() -> str:
            now = self.api.get(f"/api/jobs/{job_id}").text
            return f"job {job_id} to be {status}; it is {now}\n{self.logs()}"

        return wait_until(reached, timeout=timeout, interval=0.1, what=state)

    def wait_ingestion(self, ingestion: str) -> dict[str, Any]:
        def ended() -> dict[str, Any] | None:
            self._check_workers()
            flow: dict[str, Any] = self.api.get(f"/api/ingestions/{ingestion}").json()
            return flow if flow["state"] != "running" else None

        return wait_until(
            ended,
            timeout=WAIT_S,
            interval=0.1,
            what=lambda: f"ingestion {ingestion} to end\n{self.logs()}",
        )

    def _check_workers(self) -> None:
        alive = [name for name, (proc, _) in self.workers.items() if proc.poll() is None]
        assert alive, f"every worker exited:\n{self.logs()}"


def persona() -> str:
    return f"p-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def market(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Market]:
    tmp = tmp_path_factory.mktemp("persona")
    prefix = f"persona{uuid.uuid4().hex[:8]}:"
    services = FakeServices(slow_s=3.0, page_delay_s=0.2).start()
    config = Config(
        broker_url=f"{redis_server.url}?prefix={prefix}",
        status_db=str(tmp / "status.db"),
        services_url=services.url,
        soft_limit_s=4.0,
        hard_limit_s=6.0,
        lease_s=4.0,
        http_timeout_s=2.0,
        embed_timeout_s=30.0,
        retry_base_s=0.1,
    )
    served: Served | None = None
    logs: list[IO[bytes]] = []
    workers: dict[str, tuple[Any, Path]] = {}
    try:
        served = serve(create_api(build(config), WebConfig(users={"ops": PASSWORD})))
        for name in ("w0", "w1"):
            path = tmp / f"{name}.log"
            logs.append(path.open("wb"))
            proc = start_worker(config, logs[-1], "-c", "3", "--name", name)
            workers[name] = (proc, path)
        with httpx.Client(base_url=served.url, timeout=10) as api:
            market = Market(api, services, workers)
            _wait_registered(market, len(workers))
            yield market
    finally:
        for proc, _ in workers.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        for log in logs:
            log.close()
        if served is not None:
            served.stop()
        services.stop()
        _drop_prefix(redis_server, prefix)


def _wait_registered(market: Market, count: int) -> None:
    def registered() -> bool:
        market._check_workers()
        workers = market.api.get("/dashboard/api/v1/workers", auth=AUTH).json()
        return len([w for w in workers if not w["lost"]]) == count

    wait_until(
        registered, timeout=30, interval=0.1, what=lambda: f"{count} workers\n{market.logs()}"
    )


def _drop_prefix(server: RedisServer, prefix: str) -> None:
    client: redis.Redis = server.client()
    with client:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.unlink(*keys)


def vectors(source: str) -> int:
    return CHUNKS_PER_DOCUMENT * CORPUS_SIZE[source]


@pytest.mark.timeout(45)
def test_the_orchestrator_fans_out_and_the_hooks_write_every_row(market: Market) -> None:
    name = persona()
    sent = market.ingest(name)
    flow = market.wait_ingestion(sent["ingestion"])
    assert flow["state"] == "succeeded"
    assert flow["summary"] == {
        "persona": name,
        "vectors": sum(vectors(s) for s in SOURCES),
        "failed": {},
    }
    for source, job_id in sent["jobs"].items():
        row = market.job(job_id)
        assert (row["persona_id"], row["source"]) == (name, source)
        assert (row["status"], row["taskmill_state"]) == ("completed", "succeeded")
        assert (row["attempt"], row["retries"], row["error"]) == (1, 0, None)
        assert row["vectors"] == vectors(source)
    shown = market.api.get(f"/api/personas/{name}").json()
    assert shown["status"] == "active"
    assert {r["job_id"] for r in shown["jobs"]} == set(sent["jobs"].values())


@pytest.mark.timeout(45)
def test_a_failing_source_is_retried_until_it_answers(market: Market) -> None:
    name = persona()
    market.services.set_fault(name, "works", plan=["500", "429", "timeout"], then="ok")
    sent = market.ingest(name)
    works = market.wait_job(sent["jobs"]["works"], "completed")
    assert works["attempt"] == 4  # 500, then 429 (Retry-After), then a timeout, then it worked
    assert works["retries"] == 3
    assert works["vectors"] == vectors("works")
    assert works["error"] is None
    assert market.services.calls(name, "works")["sources"] == 3 + 3  # 3 failures, 3 pages
    assert market.wait_ingestion(sent["ingestion"])["summary"]["failed"] == {}
    assert market.api.get(f"/api/personas/{name}").json()["status"] == "active"


@pytest.mark.timeout(45)
def test_a_permanent_failure_is_shown_and_retried_through_the_dashboard(market: Market) -> None:
    name = persona()
    market.services.set_fault(name, "quotes", plan=[], then="500")
    sent = market.ingest(name)
    quotes_id = sent["jobs"]["quotes"]
    failed = market.wait_job(quotes_id, "failed")
    assert failed["taskmill_state"] == "failed"
    assert failed["attempt"] == 4 and failed["retries"] == 3
    assert failed["error"].startswith("UpstreamError: 500 Internal Server Error from GET ")
    flow = market.wait_ingestion(sent["ingestion"])
    assert set(flow["summary"]["failed"]) == {"quotes"}
    assert flow["summary"]["vectors"] == vectors("profile") + vectors("works")
    assert market.api.get(f"/api/personas/{name}").json()["status"] == "failed"

    # only a failed job is retried; an unknown one is not found
    profile = market.api.post(f"/api/jobs/{sent['jobs']['profile']}/retry")
    assert profile.status_code == 409, profile.text
    assert market.api.post("/api/jobs/no-such-job/retry").status_code == 404

    market.services.set_fault(name, "quotes", plan=[], then="ok")  # the service recovered
    refused = market.api.post(f"/dashboard/api/v1/jobs/{quotes_id}/retry")
    assert refused.status_code == 401
    retried = market.api.post(f"/dashboard/api/v1/jobs/{quotes_id}/retry", auth=AUTH)
    assert retried.status_code == 200, retried.text
    assert retried.json()["state"] == "queued"
    done = market.wait_job(quotes_id, "completed")
    assert (done["attempt"], done["vectors"], done["error"]) == (1, vectors("quotes"), None)
    assert market.api.get(f"/api/personas/{name}").json()["status"] == "active"


@pytest.mark.timeout(45)
def test_the_soft_limit_keeps_what_was_read_and_the_hard_limit_ends_the_job(
    market: Market,
) -> None:
    name = persona()
    market.services.set_fault(name, "works", plan=[], then="endless")  # reading never ends
    market.services.set_fault(name, "quotes", plan=[], then="stall")  # ...and embedding hangs
    sent = market.ingest(name)
    works = market.wait_job(sent["jobs"]["works"], "failed")
    assert works["error"].startswith("IngestionCutShortError: soft time limit (4 s) reached")
    assert works["attempt"] == 1  # running out of time is not retried
    assert market.services.calls(name, "works")["embed"] == 1  # what was read was embedded

    quotes = market.wait_job(sent["jobs"]["quotes"], "failed")
    assert quotes["error"] == (
        "TaskTimeoutError: task persona.ingest_quotes timed out after 6 s (its hard time "
        "limit); its child process and the processes it started were killed"
    )
    assert quotes["attempt"] == 1
    # the soft limit came first: the task began embedding what it had, and hung there
    assert market.services.calls(name, "quotes")["embed"] == 1
    assert market.job(sent["jobs"]["profile"])["status"] == "completed"


@pytest.mark.timeout(30)
def test_bad_ids_are_refused_precisely(market: Market) -> None:
    refused = market.api.post("/api/personas/not a persona!/ingest")
    assert refused.status_code == 422
    (problem,) = refused.json()["detail"]
    assert problem["loc"] == ["path", "persona_id"]
    assert "should match pattern" in problem["msg"]
    # an id nobody sent is not found (Celery's AsyncResult would say PENDING)
    unknown = market.api.get("/api/jobs/wf:no-such-ingestion:0")
    assert (unknown.status_code, unknown.json()) == (
        404,
        {"detail": "no ingestion job 'wf:no-such-ingestion:0'"},
    )
    assert market.api.get("/api/ingestions/no-such-ingestion").status_code == 404


@pytest.mark.timeout(30)
def test_the_dashboard_needs_a_login(market: Market) -> None:
    for path in ("/dashboard/", "/dashboard/jobs", "/dashboard/api/v1/workers"):
        anonymous = market.api.get(path)
        assert anonymous.status_code == 401, path
        assert anonymous.headers["www-authenticate"].startswith("Basic")
        assert market.api.get(path, auth=("ops", "wrong")).status_code == 401, path
    page = market.api.get("/dashboard/", auth=AUTH)
    assert page.status_code == 200
    assert "text/html" in page.headers["content-type"]
    workers = market.api.get("/dashboard/api/v1/workers", auth=AUTH).json()
    assert {w["concurrency"] for w in workers if not w["lost"]} == {3}
    # the marketplace's own API is beside it, not behind it
    assert market.api.get(f"/api/personas/{persona()}").json()["status"] == "draft"


@pytest.mark.timeout(60)
def test_a_job_whose_worker_is_killed_completes_on_the_other(market: Market) -> None:
    name = persona()
    market.services.set_fault(name, "works", plan=["slow"], then="ok")  # the first page: 3 s
    sent = market.ingest(name)
    works_id = sent["jobs"]["works"]

    def holder() -> str | None:
        row = market.job(works_id)
        calls = market.services.calls(name, "works")["sources"]
        job = market.api.get(f"/dashboard/api/v1/jobs/{works_id}", auth=AUTH).json()
        held = row["status"] == "processing" and calls == 1 and job["state"] == "running"
        return job["worker_id"] if held else None

    worker_id = wait_until(holder, timeout=WAIT_S, interval=0.05, what="the works job to start")
    name_of_worker = worker_id.split("@", 1)[0]
    proc, _ = market.workers[name_of_worker]
    # mid-job; its pool's children, in process groups of their own, end when its pipe closes
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)

    done = market.wait_job(works_id, "completed")
    assert done["attempt"] == 2
    assert done["vectors"] == vectors("works")
    job = market.api.get(f"/dashboard/api/v1/jobs/{works_id}", auth=AUTH).json()
    assert job["lost_leases"] == 1
    assert not job["worker_id"].startswith(f"{name_of_worker}@")
    flow = market.wait_ingestion(sent["ingestion"])
    assert flow["state"] == "succeeded" and flow["summary"]["failed"] == {}


@pytest.mark.timeout(90)
def test_the_demo_runs_with_one_command(tmp_path: Path) -> None:
    """``python -m examples.persona_marketplace --once``: its own redis-server, worker and API;
    the failing source is retried through the API and the persona ends active."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TASKMILL_", "PERSONA_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PERSONA_DASHBOARD_PASSWORD"] = PASSWORD
    demo = subprocess.Popen(
        [sys.executable, "-m", "examples.persona_marketplace", "--once", "--port", "0"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = demo.communicate(timeout=60)
    finally:
        # its redis-server and worker run in sessions of their own: a demo killed outright
        # would leave them running, so it gets SIGTERM and stops them first
        stop(demo, timeout_s=20)
    assert demo.returncode == 0, out + err
    assert "UpstreamError: 500 Internal Server Error" in out  # quotes, before the retry
    assert "persona eminescu: active" in out
    assert re.search(r"dashboard +http://127\.0\.0\.1:\d+/dashboard/ +log in as admin", out)
