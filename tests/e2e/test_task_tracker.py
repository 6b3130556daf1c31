"""The Task Tracker example (seed 001) end to end, through its own surface: the webhook and the
other HTTP endpoints, its WebSockets (a real ``websockets`` client), and the dashboard's API
it mounts, served by ``python -m examples.task_tracker web`` (uvicorn, a subprocess), with
real ``taskmill worker`` processes on a real ``nats-server`` and the example's fake scoring
model (``python -m examples.task_tracker model``; faults scripted per test through its
``/faults`` endpoint).

Most tests share one set of processes on the session's NATS server, under a prefix of this
module's own; the model timeout case gets processes (and a prefix) of its own, and the NATS
restart a server and processes of its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from examples._support.processes import stop
from websockets.sync.client import connect

from servers import NatsServer, free_port
from taskmill.testing import wait_until

ROOT = Path(__file__).resolve().parents[2]
SIGNAL = "Decision: the release deadline moves to Friday"  # scores 1.0: extracted
NOISE = "lunch anyone"  # scores 0.05: not extracted
TOPICS = ["deadline", "decision", "release"]  # what the fake model finds in SIGNAL
LEASE_S = 3.0  # a SIGKILLed worker's job comes back within seconds


@dataclass
class Tracker:
    """The example's processes on one broker: the web server and its workers."""

    url: str
    model: Model
    directory: Path
    lease_s: float
    model_timeout_s: float = 30.0
    base: str = ""
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TASKMILL_", "TASK_"))}
        env.update(
            TASKMILL_URL=self.url,
            TASK_TRACKER_MODEL_URL=self.model.url,
            TASK_TRACKER_DB=str(self.directory / "messages.db"),
            TASK_TRACKER_LEASE_S=str(self.lease_s),
            TASK_TRACKER_MODEL_TIMEOUT_S=str(self.model_timeout_s),
            PYTHONPATH=str(ROOT),
            PYTHONUNBUFFERED="1",
        )
        return env

    def spawn(self, name: str, *argv: str) -> subprocess.Popen[bytes]:
        with open(self.directory / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, *argv],
                cwd=ROOT,
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # killed with its children
            )
        self.procs[name] = proc
        return proc

    def start_web(self) -> None:
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        web = self.spawn("web", "-m", "examples.task_tracker", "web", "--port", str(port))
        wait_serving(web, self.base + "/", "the web server", self.logs)

    @contextlib.contextmanager
    def running(self, *workers: str) -> Iterator[None]:
        """The web server and these workers, registered; all stopped after, whatever failed."""
        try:
            self.start_web()
            for name in workers:
                self.start_worker(name)
            self.wait_workers(*workers)
            yield
        finally:
            self.stop()

    def start_worker(self, name: str) -> subprocess.Popen[bytes]:
        # a short drain: a test's teardown must not wait for a job a fault holds up
        argv = ["-m", "taskmill", "worker", "examples.task_tracker.tasks:app", "--name", name,
                "-c", "4", "--drain-timeout", "5", "--log-level", "info"]  # fmt: skip
        return self.spawn(name, *argv)

    def wait_workers(self, *names: str) -> None:
        def alive() -> bool:
            for name in names:
                proc = self.procs[name]
                assert proc.poll() is None, f"worker {name} exited:\n{self.logs()}"
            workers = httpx.get(self.base + "/taskmill/api/v1/workers", timeout=10).json()
            up = {w["id"].split("@")[0] for w in workers if not w["lost"]}
            return up >= set(names)

        wait_until(alive, timeout=30, interval=0.1, what=f"workers {names} to register")

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def stop(self) -> None:
        for proc in self.procs.values():  # SIGTERM: the server shuts down, workers drain
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for name in list(self.procs):
            proc = self.procs.pop(name)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}"
            for p in sorted(self.directory.glob("*.log"))
        )


def wait_serving(
    proc: subprocess.Popen[bytes], url: str, what: str, logs: Callable[[], str]
) -> None:
    """Until ``url`` answers 200; at once if ``proc``, which serves it, exited."""

    def serving() -> bool:
        assert proc.poll() is None, f"{what} exited:\n{logs()}"
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(serving, timeout=30, interval=0.1, what=f"{what} to serve")


# --- fixtures ------------------------------------------------------------------------------------


@dataclass
class Model:
    """The example's fake scoring model, served by its own command."""

    url: str
    proc: subprocess.Popen[bytes]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Model]:
    port = free_port()
    log = tmp_path_factory.mktemp("model") / "model.log"
    # latency long enough that a step's progress reports are flushed (10 a second at most)
    argv = [sys.executable, "-m", "examples.task_tracker", "model", "--port", str(port),
            "--error-rate", "0", "--latency-s", "0.15:0.25"]  # fmt: skip
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    served = Model(f"http://127.0.0.1:{port}", proc)
    try:
        wait_serving(proc, served.url + "/calls", "the fake model", log.read_text)
        yield served
    finally:
        stop(proc, timeout_s=15)  # SIGTERM, then SIGKILL: a hung model must not outlive the test


@pytest.fixture(scope="module")
def tracker(
    nats_server: NatsServer, model: Model, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Tracker]:
    url = f"{nats_server.url}?prefix=tt{uuid.uuid4().hex[:10]}"
    tracker = Tracker(url, model, tmp_path_factory.mktemp("task-tracker"), LEASE_S)
    with tracker.running("w1", "w2"):
        yield tracker


@pytest.fixture
def http(tracker: Tracker) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=tracker.base, timeout=30) as client:
        yield client


@pytest.fixture(autouse=True)
def no_faults(model: Model) -> Iterator[None]:
    yield
    httpx.delete(model.url + "/faults", timeout=10).raise_for_status()


def fault(model: Model, match: str, status: int, **options: float) -> None:
    body = {"match": match, "status": status, **options}
    httpx.post(model.url + "/faults", json=body, timeout=10).raise_for_status()


def send(http: httpx.Client, text: str, author: str = "alice") -> str:
    """Post a new Telegram message to the webhook; its key."""
    body = {"chat_id": -100, "message_id": uuid.uuid4().int % 10**9 + 1, "author": author,
            "text": text}  # fmt: skip
    answer = http.post("/webhook/telegram", json=body)
    assert answer.status_code == 202, answer.text
    assert answer.json()["duplicate"] is False
    return str(answer.json()["message"])


def result(http: httpx.Client, key: str, timeout: float = 30) -> httpx.Response:
    return http.get(f"/messages/{key}/result", params={"timeout": timeout})


def job(http: httpx.Client, job_id: str) -> dict[str, Any]:
    """The job as the dashboard's API has it."""
    found = job_if_sent(http, job_id)
    assert found is not None, f"no job {job_id}"
    return found


def job_if_sent(http: httpx.Client, job_id: str) -> dict[str, Any] | None:
    answer = http.get(f"/taskmill/api/v1/jobs/{job_id}")
    if answer.status_code == 404:
        return None
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def wait_running(http: httpx.Client, job_id: str) -> dict[str, Any]:
    def running() -> dict[str, Any] | None:
        found = job_if_sent(http, job_id)
        return found if found is not None and found["state"] == "running" else None

    return wait_until(running, timeout=30, interval=0.05, what=f"{job_id} to start")


# --- the cases -----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_message_is_saved_scored_and_extracted_with_progress_over_the_websocket(
    tracker: Tracker, http: httpx.Client
) -> None:
    key = send(http, SIGNAL)
    ws_url = tracker.base.replace("http://", "ws://") + f"/messages/{key}/events"
    with connect(ws_url, open_timeout=10) as ws:
        events = [json.loads(message) for message in ws]  # until the server closes it
    steps = [e["job_id"].split("-")[0] for e in events]
    assert steps[0] == "save" and steps[-1] == "extract"
    assert steps == sorted(steps, key=["save", "score", "extract"].index)  # in order
    ends = [e for e in events if e["state"] == "succeeded"]
    assert [e["job_id"] for e in ends] == [f"save-{key}", f"score-{key}", f"extract-{key}"]
    progress = [e["message"] for e in events if e["progress"] is not None]
    assert any(m.startswith(("asking", "scored", "extracting", "saving")) for m in progress)

    done = result(http, key)
    assert done.status_code == 200, done.text
    results = done.json()["results"]
    assert results["score"]["score"] >= 0.7
    assert (results["score"]["classification"], results["score"]["extract"]) == ("signal", True)
    assert results["extract"] == {"topics": TOPICS}
    message = http.get(f"/messages/{key}").json()
    assert message["message"]["topics"] == TOPICS
    assert {s["state"] for s in message["steps"].values()} == {"succeeded"}

    # Telegram delivering the same update again stores nothing new
    chat, message_id = key.rsplit("-", 1)
    again = http.post("/webhook/telegram", json={"chat_id": int(chat), "author": "alice",
                      "message_id": int(message_id), "text": SIGNAL})  # fmt: skip
    assert again.json() == {"message": key, "job": f"save-{key}", "duplicate": True}


@pytest.mark.timeout(60)
def test_noise_is_scored_and_not_extracted(tracker: Tracker, http: httpx.Client) -> None:
    key = send(http, NOISE)
    done = result(http, key)
    assert done.status_code == 200, done.text
    assert done.json()["results"]["score"]["classification"] == "noise"
    assert "extract" not in done.json()["results"]
    assert http.get(f"/messages/{key}").json()["steps"]["extract"]["state"] is None


@pytest.mark.timeout(60)
def test_a_failing_and_rate_limited_model_is_retried_to_success(
    tracker: Tracker, model: Model, http: httpx.Client
) -> None:
    token = f"flaky-{uuid.uuid4().hex[:8]}"
    fault(model, token, 500, times=1)
    fault(model, token, 429, times=1, retry_after_s=0.5)
    key = send(http, f"{NOISE} {token}")
    done = result(http, key)
    assert done.status_code == 200, done.text
    score = job(http, f"score-{key}")
    assert (score["state"], score["attempt"]) == ("succeeded", 3)  # 500, then 429, then 200
    calls = httpx.get(model.url + "/calls", timeout=10).json()
    assert calls["/score 500"] >= 1 and calls["/score 429"] >= 1


@pytest.mark.timeout(60)
def test_a_refused_message_fails_visibly_and_is_retried_to_success(
    tracker: Tracker, model: Model, http: httpx.Client
) -> None:
    token = f"refused-{uuid.uuid4().hex[:8]}"
    fault(model, token, 422, times=1)
    key = send(http, f"{SIGNAL} {token}")
    failed = result(http, key)
    assert failed.status_code == 409, failed.text
    assert failed.json()["failed"] == "score"
    assert "422 cannot score this text" in failed.json()["error"]
    steps = http.get(f"/messages/{key}").json()["steps"]
    assert steps["score"]["state"] == "failed" and steps["score"]["attempt"] == 1  # not retried
    assert steps["extract"]["state"] is None
    assert job(http, f"score-{key}")["state"] == "failed"  # the dashboard shows it too

    retried = http.post(f"/messages/{key}/retry")
    assert retried.json() == {"message": key, "retried": [f"score-{key}"]}
    done = result(http, key)
    assert done.status_code == 200, done.text
    assert done.json()["results"]["extract"]["topics"] == TOPICS
    assert http.post(f"/messages/{key}/retry").status_code == 409  # nothing failed now


@pytest.mark.timeout(60)
def test_a_job_of_a_sigkilled_worker_completes_on_another(
    tracker: Tracker, model: Model, http: httpx.Client
) -> None:
    token = f"slow-{uuid.uuid4().hex[:8]}"
    fault(model, token, 200, times=1, delay_s=20)  # the first call hangs; the next is quick
    key = send(http, f"{NOISE} {token}")
    running = wait_running(http, f"score-{key}")
    victim = running["worker_id"].split("@")[0]
    tracker.kill(victim)
    try:
        done = result(http, key, timeout=30)
        assert done.status_code == 200, done.text
        score = job(http, f"score-{key}")
        assert score["attempt"] == 2 and score["lost_leases"] == 1
        assert not score["worker_id"].startswith(f"{victim}@")
    finally:
        tracker.start_worker(victim)  # back to two for whatever runs next
        tracker.wait_workers(victim)


@pytest.fixture
def impatient_tracker(nats_server: NatsServer, model: Model, tmp_path: Path) -> Iterator[Tracker]:
    """Processes of their own (a prefix of their own) whose model calls give up after 1 s."""
    url = f"{nats_server.url}?prefix=tt{uuid.uuid4().hex[:10]}"
    tracker = Tracker(url, model, tmp_path, lease_s=10.0, model_timeout_s=1.0)
    with tracker.running("impatient"):
        yield tracker


@pytest.mark.timeout(60)
def test_a_model_call_that_times_out_is_retried(impatient_tracker: Tracker, model: Model) -> None:
    token = f"hung-{uuid.uuid4().hex[:8]}"
    fault(model, token, 200, times=1, delay_s=4)  # answers after the caller gave up
    with httpx.Client(base_url=impatient_tracker.base, timeout=30) as http:
        key = send(http, f"{NOISE} {token}")
        done = result(http, key)
        assert done.status_code == 200, done.text
        score = job(http, f"score-{key}")
        assert (score["state"], score["attempt"]) == ("succeeded", 2)


@pytest.fixture
def own_tracker(nats_server_own: NatsServer, model: Model, tmp_path: Path) -> Iterator[Tracker]:
    tracker = Tracker(nats_server_own.url, model, tmp_path / "tracker", lease_s=10.0)
    tracker.directory.mkdir()
    with tracker.running("solo"):
        yield tracker


@pytest.mark.timeout(90)
def test_the_worker_and_the_web_server_carry_on_after_nats_restarts(
    own_tracker: Tracker, nats_server_own: NatsServer, model: Model
) -> None:
    tracker = own_tracker
    with httpx.Client(base_url=tracker.base, timeout=60) as http:
        before = send(http, SIGNAL)
        assert result(http, before).status_code == 200
        token = f"during-{uuid.uuid4().hex[:8]}"
        fault(model, token, 200, times=1, delay_s=2)
        during = send(http, f"{SIGNAL} {token}")
        wait_running(http, f"score-{during}")

        nats_server_own.restart(kill=True)  # mid-job: its outcome is written after

        done = result(http, during, timeout=45)
        assert done.status_code == 200, done.text
        assert done.json()["results"]["extract"]["topics"] == TOPICS
        after = send(http, NOISE)
        assert result(http, after, timeout=45).status_code == 200
        assert tracker.procs["solo"].poll() is None, tracker.logs()  # the same process
        ran = {job(http, f"score-{k}")["worker_id"] for k in (before, during, after)}
        assert len(ran) == 1 and next(iter(ran)).startswith("solo@")
