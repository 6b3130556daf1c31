"""examples/avatar_generator (seed 000) end to end: its HTTP API served on a loopback port,
real ``flask ... taskmill worker`` processes, the fake persona API with injected faults, on
SQLite and on PostgreSQL."""

from __future__ import annotations

import doctest
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from examples.avatar_generator import status, tasks
from examples.avatar_generator.fake_api import FakeAvatarApi
from examples.avatar_generator.run import Server, Workers, call
from examples.avatar_generator.web import create_app
from flask import Flask

from taskmill import App
from taskmill.integrations.flask import EXTENSION_KEY
from taskmill.testing import wait_until

ROOT = Path(__file__).resolve().parents[2]


LEASE_S = 2  # a SIGKILLed worker's job is back within seconds


@dataclass
class Stack:
    api: FakeAvatarApi
    flask_app: Flask
    server: Server
    workers: Workers

    @property
    def taskmill(self) -> App:
        return self.flask_app.extensions[EXTENSION_KEY]  # type: ignore[no-any-return]

    def start_worker(self) -> None:
        proc = self.workers.start("-c", "8")

        def registered() -> bool:
            assert proc.poll() is None, f"a worker exited early:\n{self.workers.output()}"
            return any(w.pid == proc.pid for w in self.taskmill.workers())

        wait_until(registered, what="the worker to register", timeout=30)

    def send(self, prompt: str, quantity: int) -> str:
        status, body = call(
            "POST", f"{self.server.url}/api/requests", {"prompt": prompt, "quantity": quantity}
        )
        assert status == 202, body
        return str(body["id"])

    def get(self, request_id: str) -> dict[str, Any]:
        status, body = call("GET", f"{self.server.url}/api/requests/{request_id}")
        assert status == 200, body
        return body  # type: ignore[no-any-return]

    def wait_status(self, request_id: str, status: str, timeout: float = 30) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            found = self.get(request_id)
            return found if found["status"] == status else None

        return wait_until(
            reached,
            what=lambda: (
                f"request {request_id} to be {status}: {self.get(request_id)}\n"
                f"{self.workers.output()[-3000:]}"
            ),
            timeout=timeout,
        )


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    tmp: Path = tmp_path_factory.mktemp(f"avatars-{request.param}")
    if request.param == "postgres":
        server = request.getfixturevalue("postgres_server")
        url = f"{server.url}?schema=t{uuid.uuid4().hex[:12]}"
    else:
        url = f"sqlite:///{tmp}/avatars.db"
    api = FakeAvatarApi(latency_s=0.15).start()
    config = {
        "TASKMILL_URL": url,
        "TASKMILL_LEASE_S": LEASE_S,
        "AVATAR_API_URL": api.url,
        "AVATAR_API_TIMEOUT_S": 2,
    }
    flask_app = create_app(**config)
    flask_app.extensions[EXTENSION_KEY].open()  # the schema exists before the workers start
    stack = Stack(api, flask_app, Server(flask_app).start(), Workers(tmp, config))
    try:
        for _ in range(2):
            stack.start_worker()
        yield stack
    finally:
        stack.server.stop()
        stack.workers.stop()
        stack.api.stop()
        stack.taskmill.close()


@pytest.mark.timeout(40)
def test_a_request_is_generated_in_batches_at_most_5_api_calls_at_once(stack: Stack) -> None:
    stack.api.reset_peak()
    request_id = stack.send("happy astronauts", 200)
    done = stack.wait_status(request_id, "completed")
    assert done["personas"] == 200
    assert [b["personas"] for b in done["batches"]] == [20] * 10
    assert {b["attempt"] for b in done["batches"]} == {1}
    # two workers with 8 slots each, yet the API never saw more than the limit
    assert 2 <= stack.api.max_in_flight <= 5
    page = call("GET", f"{stack.server.url}/requests/{request_id}")[1]
    assert "completed" in page
    assert "Ada Lovelace" in page
    status, error = call("POST", f"{stack.server.url}/api/requests", {"prompt": "x", "quantity": 0})
    assert (status, error) == (400, {"error": "quantity must be from 1 to 1000, not 0"})
    missing = call("GET", f"{stack.server.url}/api/requests/nope")
    assert missing == (404, {"error": "no request nope"})


@pytest.mark.timeout(40)
def test_failed_api_calls_are_retried_until_they_succeed(stack: Stack) -> None:
    prompt = "flaky painters"
    stack.api.inject(prompt, 0, "500")
    stack.api.inject(prompt, 1, "429")
    stack.api.inject(prompt, 2, "timeout", seconds=4)  # the client waits 2 s
    request_id = stack.send(prompt, 60)
    done = stack.wait_status(request_id, "completed")
    assert done["personas"] == 60
    assert [b["attempt"] for b in done["batches"]] == [2, 2, 2]
    assert [stack.api.calls_for(prompt, n) for n in range(3)] == [2, 2, 2]


@pytest.mark.timeout(40)
def test_a_rejected_batch_leaves_a_partial_request_retried_from_the_api(stack: Stack) -> None:
    prompt = "forbidden poets"
    stack.api.inject(prompt, 1, "reject")
    request_id = stack.send(prompt, 60)
    partial = stack.wait_status(request_id, "partial")
    assert (partial["personas"], partial["failed_batches"]) == (40, [1])
    failed = partial["batches"][1]
    assert failed["state"] == "failed"
    assert failed["attempt"] == 1  # refused: not retried
    assert "PromptRejectedError" in failed["error"]
    assert "HTTP 422" in failed["error"]
    page = call("GET", f"{stack.server.url}/")[1]  # the UI lists it, with a retry button
    assert f'action="/requests/{request_id}/retry"' in page

    status, body = call("POST", f"{stack.server.url}/api/requests/{request_id}/retry")
    assert (status, body) == (202, {"retried": [failed["job_id"]]})
    done = stack.wait_status(request_id, "completed")
    assert (done["personas"], done["failed_batches"]) == (60, [])
    again = call("POST", f"{stack.server.url}/api/requests/{request_id}/retry")
    assert again == (409, {"retried": []})

    # the same through the HTML form and its retry button
    stack.api.inject("refused", 0, "reject")
    made = httpx.post(f"{stack.server.url}/requests", data={"prompt": "refused", "quantity": 20})
    assert made.status_code == 303
    all_refused = made.headers["location"].removeprefix("/requests/")
    assert stack.wait_status(all_refused, "failed")["personas"] == 0
    retried = httpx.post(f"{stack.server.url}/requests/{all_refused}/retry")
    assert (retried.status_code, retried.headers["location"]) == (303, made.headers["location"])
    assert stack.wait_status(all_refused, "completed")["personas"] == 20


@pytest.mark.timeout(60)
def test_a_batch_whose_worker_is_killed_completes_on_another(stack: Stack) -> None:
    prompt = "doomed worker"
    stack.api.inject(prompt, 0, "slow", seconds=30)
    request_id = stack.send(prompt, 20)
    wait_until(lambda: stack.api.calls_for(prompt, 0) == 1, what="the first call", timeout=20)
    job = stack.taskmill.get_job(stack.get(request_id)["batches"][0]["job_id"])
    (pid,) = [w.pid for w in stack.taskmill.workers() if w.id == job.worker_id]
    (victim,) = [p for p, _ in stack.workers.procs if p.pid == pid]
    stack.workers.kill(victim)
    stack.start_worker()  # the pool back to two

    done = stack.wait_status(request_id, "completed", timeout=40)
    assert done["personas"] == 20
    assert done["batches"][0]["attempt"] == 2
    assert stack.api.calls_for(prompt, 0) == 2
    assert stack.taskmill.get_job(job.id).lost_leases == 1


@pytest.mark.timeout(10)
@pytest.mark.parametrize("module", [status, tasks], ids=lambda m: m.__name__)
def test_the_examples_docstring_examples_hold(module: object) -> None:
    """The status pipeline and the batch split, by their doctests."""
    failures, tried = doctest.testmod(module)  # type: ignore[arg-type]
    assert (failures, tried > 0) == (0, True)
