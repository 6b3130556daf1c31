"""The HTTP API against the real app under uvicorn, on SQLite, Redis and PostgreSQL: every
route, and every error it documents (docs/api.md)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from taskmill import App, JobState
from taskmill.testing import running_worker, wait_until

XSS = "<script>alert(1)</script>"


def send(api: httpx.Client, task: str, *args: object, **fields: object) -> httpx.Response:
    return api.post("/api/v1/jobs", json={"task": task, "args": list(args), **fields})


def sent_id(response: httpx.Response) -> str:
    assert response.status_code == 201, response.text
    job_id: str = response.json()["id"]
    return job_id


def total(api: httpx.Client, **filters: str) -> int:
    response = api.get("/api/v1/jobs", params=filters)
    assert response.status_code == 200, response.text
    count: int = response.json()["total"]
    return count


def failed_job(api: httpx.Client, app: App) -> str:
    job_id = sent_id(send(api, "ops.fail"))
    app.run_until_idle()
    assert app.get_job(job_id).state is JobState.FAILED
    return job_id


# --- POST /jobs, GET /jobs/{id} ----------------------------------------------------------------


def test_a_sent_job_is_stored_and_read_back(api: httpx.Client, web_app: App) -> None:
    response = send(api, "math.add", 1, 2)
    assert response.status_code == 201
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["state"] == "queued" and body["existing"] is False
    job = web_app.get_job(body["id"])
    assert (job.task, job.queue, job.state) == ("math.add", "default", JobState.QUEUED)

    shown = api.get(f"/api/v1/jobs/{body['id']}")
    assert shown.status_code == 200
    view = shown.json()
    assert (view["id"], view["task"], view["args"], view["kwargs"]) == (
        body["id"], "math.add", [1, 2], {},
    )  # fmt: skip
    web_app.run_until_idle()
    done = api.get(f"/api/v1/jobs/{body['id']}").json()
    assert (done["state"], done["result"], done["attempt"]) == ("succeeded", 3, 1)


def test_a_script_argument_comes_back_as_json_text(api: httpx.Client) -> None:
    job_id = sent_id(api.post("/api/v1/jobs", json={"task": "text.echo", "kwargs": {"text": XSS}}))
    response = api.get(f"/api/v1/jobs/{job_id}")
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert json.loads(response.text)["kwargs"] == {"text": XSS}  # data, never markup
    listed = api.get("/api/v1/jobs", params={"task": "text."})
    assert listed.headers["content-type"] == "application/json"
    assert [j["kwargs"]["text"] for j in listed.json()["jobs"]] == [XSS]


def test_send_options(api: httpx.Client, web_app: App) -> None:
    later = send(api, "math.add", 1, 2, queue="slow", priority="high", delay=3600,
                 meta={"user_id": 42})  # fmt: skip
    assert later.status_code == 201 and later.json()["state"] == "scheduled"
    job = web_app.get_job(later.json()["id"])
    assert (job.queue, job.priority, job.state, job.meta) == (
        "slow", 50, JobState.SCHEDULED, {"user_id": 42},
    )  # fmt: skip

    at = (datetime.now(UTC) + timedelta(hours=2)).isoformat()
    timed = send(api, "math.add", 3, 4, run_at=at, priority=7)
    assert timed.json()["state"] == "scheduled"
    assert web_app.get_job(timed.json()["id"]).priority == 7

    first = send(api, "math.add", 5, 6, key="once", job_id="add-5-6")
    assert first.status_code == 201 and first.json()["id"] == "add-5-6"
    again = send(api, "math.add", 5, 6, key="once")
    assert again.status_code == 200  # nothing new stored: the pending job with that key
    assert again.json() == {"id": "add-5-6", "state": "queued", "existing": True}
    assert total(api, task="math.") == 3


def test_concurrent_sends_are_each_stored_once(
    web_app: App, serve: Callable[..., str], caplog: pytest.LogCaptureFixture
) -> None:
    """Requests that arrive while a write is in flight are stored together (one broker call
    for many): each gets its own job, every job is stored once, with its own arguments."""
    url = serve(web_app)
    caplog.set_level(logging.INFO, logger="taskmill.web")
    caplog.set_level(logging.DEBUG, logger="taskmill.broker")  # a record per broker call

    async def send_all() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=20)
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
            return await asyncio.gather(*(
                client.post("/api/v1/jobs", json={"task": "math.add", "args": [n, 1]})
                for n in range(100)
            ))  # fmt: skip

    responses = asyncio.run(send_all())
    assert [r.status_code for r in responses] == [201] * 100
    ids = [r.json()["id"] for r in responses]
    assert len(set(ids)) == 100
    stored = {job_id: web_app.get_job(job_id).payload for job_id in ids}
    assert [stored[i] for i in ids] == [f"[[{n},1],{{}}]".encode() for n in range(100)]
    assert web_app.list_jobs(limit=1000).total == 100
    sent = [r for r in caplog.records if r.getMessage().startswith("anonymous@127.0.0.1 sent")]
    assert len(sent) == 100
    writes = [r.__dict__["jobs"] for r in caplog.records if r.__dict__.get("method") == "enqueue"]
    assert sum(writes) == 100
    assert len(writes) < 100  # 100 requests on 20 connections: some shared a write
    web_app.run_until_idle()
    assert [web_app.get_job(i).result for i in ids[:3]] == [b"1", b"2", b"3"]


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"task": "math.sub", "args": [1, 2]}, 404, "no task named 'math.sub'"),
        ({"task": "math.add", "args": [1]}, 422, "missing a required argument: 'b'"),
        ({"task": "math.add", "args": [1, 2, 3]}, 422, "too many positional arguments"),
        ({"task": "math.add", "kwargs": {"a": 1, "b": 2, "c": 3}}, 422, "keyword argument 'c'"),
        ({"task": "math.add", "args": ["one", 2]}, 422, "argument 'a'"),
        ({"task": "math.add", "args": "1, 2"}, 422, "Expected `array`, got `str` - at `$.args`"),
        ({"args": [1, 2]}, 422, "missing required field `task`"),
        ({"task": "math.add", "args": [1, 2], "colour": "red"}, 422, "unknown field `colour`"),
        ({"task": "math.add", "args": [1, 2], "priority": "asap"}, 422, "unknown priority"),
        ({"task": "math.add", "args": [1, 2], "delay": -1}, 422, "non-negative"),
        ({"task": "math.add", "args": [1, 2], "run_at": "2026-01-01T09:00:00"}, 422,
         "run_at needs a time zone"),
        ({"task": "math.add", "args": [1, 2], "meta": {"user": [1]}}, 422, "meta"),
        ({"task": "math.add", "args": [1, 2], "queue": " "}, 422, "queue"),
    ],
)  # fmt: skip
def test_send_errors_name_the_problem_and_store_nothing(
    api: httpx.Client, body: dict[str, object], status: int, words: str
) -> None:
    response = api.post("/api/v1/jobs", json=body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert words in response.json()["error"]
    assert total(api) == 0


def test_a_full_queue_refuses_with_503(web_app: App, serve: Callable[..., str]) -> None:
    web_app.configure_queue("text", max_depth=1)
    with httpx.Client(base_url=serve(web_app), timeout=10) as api:
        first = api.post("/api/v1/jobs", json={"task": "text.echo", "args": ["a"]})
        assert first.status_code == 201
        full = api.post("/api/v1/jobs", json={"task": "text.echo", "args": ["b"]})
        assert full.status_code == 503
        assert full.json()["error"].endswith(
            "its max_depth is 1: 1 more refused, nothing was stored"
        )
        assert total(api, queue="text") == 1


def test_bodies_that_are_not_json(api: httpx.Client) -> None:
    broken = api.post("/api/v1/jobs", content=b'{"task": "math.add", ',
                      headers={"content-type": "application/json"})  # fmt: skip
    assert broken.status_code == 400
    assert broken.json()["error"].startswith("the body is not valid JSON")
    form = api.post("/api/v1/jobs", data={"task": "math.add"})
    assert form.status_code == 415 and "application/json" in form.json()["error"]
    assert total(api) == 0


def test_an_unknown_job_is_404(api: httpx.Client) -> None:
    for method, path in [
        ("GET", "/api/v1/jobs/nope"),
        ("POST", "/api/v1/jobs/nope/cancel"),
        ("POST", "/api/v1/jobs/nope/retry"),
        ("POST", "/api/v1/jobs/nope/run"),
    ]:
        response = api.request(method, path)
        assert response.status_code == 404, (method, path)
        assert response.json() == {"error": "job nope does not exist (or was pruned)"}


def test_unknown_routes_and_methods_answer_json(api: httpx.Client) -> None:
    missing = api.get("/api/v1/nothing-here")
    assert missing.status_code == 404 and missing.json() == {"error": "Not Found"}
    wrong = api.delete("/api/v1/jobs")
    assert wrong.status_code == 405 and "error" in wrong.json()
    assert set(wrong.headers["allow"].replace(" ", "").split(",")) == {"GET", "HEAD", "POST"}


# --- GET /jobs ---------------------------------------------------------------------------------


def test_list_jobs_filters_and_pages(api: httpx.Client, web_app: App) -> None:
    ids = [sent_id(send(api, "math.add", n, n, meta={"n": n})) for n in range(5)]
    sent_id(api.post("/api/v1/jobs", json={"task": "text.echo", "args": ["hi"]}))
    failed = failed_job(api, web_app)  # runs the others too
    assert total(api) == 7
    assert total(api, state="failed") == 1
    assert total(api, state="failed,succeeded") == 7
    assert total(api, queue="text") == 1
    assert total(api, task="math.") == 5
    assert total(api, meta="n=3") == 1
    finished = api.get("/api/v1/jobs", params={"order": "finished", "limit": 1}).json()
    assert len(finished["jobs"]) == 1 and finished["jobs"][0]["finished_at"] is not None
    assert api.get("/api/v1/jobs", params={"state": "failed"}).json()["jobs"][0]["id"] == failed

    seen: list[str] = []
    params: dict[str, str] = {"task": "math.", "limit": "2"}
    while True:
        page = api.get("/api/v1/jobs", params=params).json()
        seen += [j["id"] for j in page["jobs"]]
        if page["next_cursor"] is None:
            break
        params = {"task": "math.", "limit": "2", "cursor": page["next_cursor"], "count": "false"}
        assert page["total"] in (5, None)
    assert seen == list(reversed(ids))


def test_list_jobs_by_key(api: httpx.Client, web_app: App) -> None:
    held = sent_id(send(api, "math.add", 1, 2, key="order-9", delay=3600))
    sent_id(send(api, "math.add", 3, 4))
    page = api.get("/api/v1/jobs", params={"key": "order-9"}).json()
    assert [j["id"] for j in page["jobs"]] == [held] and page["jobs"][0]["key"] == "order-9"
    assert (page["next_cursor"], page["total"]) == (None, 1)
    uncounted = api.get("/api/v1/jobs", params={"key": "order-9", "count": "false"}).json()
    assert [j["id"] for j in uncounted["jobs"]] == [held] and uncounted["total"] is None
    none = api.get("/api/v1/jobs", params={"key": "order-10"}).json()
    assert none == {"jobs": [], "next_cursor": None, "total": 0}
    assert web_app.cancel_job(held) is JobState.CANCELLED
    released = api.get("/api/v1/jobs", params={"key": "order-9"}).json()
    assert released["jobs"] == [], "a finished job holds no key"


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"key": "k", "state": "queued"}, "key finds one job: it takes no state"),
        ({"key": ""}, "key must not be empty"),
        ({"key": "k", "limit": "0"}, "limit must be a whole number from 1 to 1000"),
        ({"state": "done"}, "unknown job state 'done'"),
        ({"limit": "0"}, "limit must be a whole number from 1 to 1000"),
        ({"limit": "ten"}, "limit must be a whole number"),
        ({"order": "random"}, "order must be"),
        ({"order": "finished", "state": "queued"}, "queued"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"count": "maybe"}, "count must be true or false"),
        ({"meta": "no-equals-sign"}, "KEY=VALUE"),
        ({"sate": "failed"}, "unknown query parameter 'sate'"),
    ],
)
def test_list_jobs_errors(api: httpx.Client, params: dict[str, str], words: str) -> None:
    response = api.get("/api/v1/jobs", params=params)
    assert response.status_code == 422, response.text
    assert words in response.json()["error"]


# --- job actions -------------------------------------------------------------------------------


def test_cancel(api: httpx.Client, web_app: App) -> None:
    waiting = sent_id(send(api, "math.add", 1, 2, delay=3600))
    response = api.post(f"/api/v1/jobs/{waiting}/cancel")
    assert response.status_code == 200
    assert response.json() == {"id": waiting, "state": "cancelled"}
    assert web_app.get_job(waiting).state is JobState.CANCELLED

    done = sent_id(send(api, "math.add", 1, 2))
    web_app.run_until_idle()
    refused = api.post(f"/api/v1/jobs/{done}/cancel")
    assert refused.status_code == 409 and "succeeded already" in refused.json()["error"]


def test_retry_one_job(api: httpx.Client, web_app: App) -> None:
    failed = failed_job(api, web_app)
    response = api.post(f"/api/v1/jobs/{failed}/retry")
    assert response.status_code == 200
    assert response.json() == {"id": failed, "state": "queued"}
    assert web_app.get_job(failed).state is JobState.QUEUED
    refused = api.post(f"/api/v1/jobs/{failed}/retry")  # queued now: nothing to retry
    assert refused.status_code == 409
    assert "only failed or cancelled jobs" in refused.json()["error"]


def test_run_a_scheduled_job_now(api: httpx.Client, web_app: App) -> None:
    later = sent_id(send(api, "math.add", 1, 2, delay=3600))
    response = api.post(f"/api/v1/jobs/{later}/run")
    assert response.status_code == 200 and response.json()["was"] == "scheduled"
    assert web_app.get_job(later).state is JobState.QUEUED
    web_app.run_until_idle()
    refused = api.post(f"/api/v1/jobs/{later}/run")
    assert refused.status_code == 409 and "succeeded" in refused.json()["error"]


def test_retry_many(api: httpx.Client, web_app: App) -> None:
    first, second = failed_job(api, web_app), failed_job(api, web_app)
    by_ids = api.post("/api/v1/jobs/retry", json={"ids": [first]})
    assert by_ids.json() == {"retried": [first], "count": 1}
    web_app.run_until_idle()
    by_task = api.post("/api/v1/jobs/retry", json={"task": "ops."})
    assert sorted(by_task.json()["retried"]) == sorted([first, second])
    web_app.run_until_idle()
    everything = api.post("/api/v1/jobs/retry", json={"all": True})
    assert everything.json()["count"] == 2
    assert {web_app.get_job(i).state for i in (first, second)} == {JobState.QUEUED}
    none = api.post("/api/v1/jobs/retry", json={"queue": "text"})
    assert none.json() == {"retried": [], "count": 0}


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({}, "give one of"),
        ({"ids": ["x"], "queue": "default"}, "give one of"),
        ({"all": True, "task": "ops."}, "give one of"),
        ({"ids": "x"}, "Expected `array | null`, got `str` - at `$.ids`"),
    ],
)
def test_retry_many_errors(api: httpx.Client, body: dict[str, object], words: str) -> None:
    response = api.post("/api/v1/jobs/retry", json=body)
    assert response.status_code == 422 and words in response.json()["error"]


# --- queues, workers, tasks, schedules ---------------------------------------------------------


def test_queues_pause_resume_purge(api: httpx.Client, web_app: App) -> None:
    sent_id(send(api, "math.add", 1, 2))
    sent_id(send(api, "math.add", 3, 4, delay=3600))
    queues = {q["queue"]: q for q in api.get("/api/v1/queues").json()}
    assert set(queues) == {"default", "text"}
    assert queues["default"]["counts"]["queued"] == 1
    assert queues["default"]["counts"]["scheduled"] == 1
    assert queues["default"]["paused"] is False

    paused = api.post("/api/v1/queues/default/pause")
    assert paused.json() == {"queue": "default", "paused": True}
    assert [s.paused for s in web_app.stats() if s.queue == "default"] == [True]
    assert web_app.run_until_idle() == 0  # paused: nothing is claimed
    resumed = api.post("/api/v1/queues/default/resume")
    assert resumed.json() == {"queue": "default", "paused": False}
    assert [s.paused for s in web_app.stats() if s.queue == "default"] == [False]

    purged = api.post("/api/v1/queues/default/purge")
    assert purged.json() == {"queue": "default", "purged": 2}
    assert total(api) == 0


def test_workers(api: httpx.Client, web_app: App) -> None:
    assert api.get("/api/v1/workers").json() == []
    with running_worker(web_app, concurrency=3) as worker:
        wait_until(lambda: web_app.workers(), what="the worker to register")
        (shown,) = api.get("/api/v1/workers").json()
        assert (shown["id"], shown["concurrency"], shown["lost"]) == (worker.id, 3, False)
        assert shown["heartbeat_age_s"] >= 0


def test_tasks(api: httpx.Client) -> None:
    tasks = {t["name"]: t for t in api.get("/api/v1/tasks").json()}
    assert set(tasks) == {"auth.login", "math.add", "ops.fail", "text.echo"}
    assert tasks["text.echo"]["queue"] == "text"
    assert tasks["math.add"]["schedules"][0]["name"] == "nightly-add"


def test_schedules_list_and_trigger(api: httpx.Client, web_app: App) -> None:
    (schedule,) = api.get("/api/v1/schedules").json()
    assert (schedule["name"], schedule["task"], schedule["cron"]) == (
        "nightly-add", "math.add", "0 2 * * *",
    )  # fmt: skip
    assert len(schedule["next"]) == 3 and schedule["last_tick"] is None

    triggered = api.post("/api/v1/schedules/nightly-add/trigger")
    assert triggered.status_code == 201
    job = web_app.get_job(triggered.json()["id"])
    assert (job.task, job.state, job.payload) == ("math.add", JobState.QUEUED, b"[[1,2],{}]")
    missing = api.post("/api/v1/schedules/weekly/trigger")
    assert missing.status_code == 404
    assert missing.json()["error"] == "no schedule named 'weekly' (known: nightly-add)"


# --- events ------------------------------------------------------------------------------------


def test_events_stream_a_jobs_transitions(
    make_app: Callable[..., App], serve: Callable[..., str]
) -> None:
    app = make_app(events=True)
    with httpx.Client(base_url=serve(app), timeout=20) as api, running_worker(app):
        job_id = "watched-job"
        with api.stream("GET", "/api/v1/events", params={"job_id": job_id}) as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            lines = stream.iter_lines()
            assert next(lines) == ": listening"  # subscribed: what follows is seen
            other = sent_id(send(api, "math.add", 3, 4))  # another job: filtered out
            assert app.job(other).result(timeout=10) == 7
            sent_id(send(api, "math.add", 1, 2, job_id=job_id))
            states = []
            for line in lines:
                if line.startswith("data: "):
                    event = json.loads(line.removeprefix("data: "))
                    assert event["job_id"] == job_id and "payload" not in event
                    states.append(event["state"])
                    if event["state"] == "succeeded":
                        break
        assert states == ["queued", "running", "succeeded"]


def test_events_off_is_a_clear_error(api: httpx.Client) -> None:
    response = api.get("/api/v1/events")
    assert response.status_code == 409
    assert "events are off" in response.json()["error"]


# --- redaction ---------------------------------------------------------------------------------


def test_secrets_in_arguments_results_and_errors_are_redacted(
    api: httpx.Client, web_app: App
) -> None:
    login = {"task": "auth.login", "kwargs": {"user": "ann", "password": "hunter2-secret"}}
    by_name = sent_id(api.post("/api/v1/jobs", json=login))
    by_position = sent_id(send(api, "auth.login", "nobody", "p0sitional-secret"))
    web_app.run_until_idle()

    named = api.get(f"/api/v1/jobs/{by_name}")
    assert named.json()["kwargs"] == {"user": "ann", "password": "[redacted]"}
    assert named.json()["result"] == {"user": "ann", "session_token": "[redacted]"}
    assert "hunter2-secret" not in named.text and "s3ss10n-t0k3n" not in named.text

    positional = api.get(f"/api/v1/jobs/{by_position}")
    assert positional.json()["args"] == ["nobody", "[redacted]"]
    error = positional.json()["error"]
    assert error["type"] == "PermissionError"  # its message quoted the password:
    assert "[redacted]" in error["message"] and "p0sitional-secret" not in positional.text

    listed = api.get("/api/v1/jobs", params={"task": "auth."}).text
    assert "hunter2-secret" not in listed and "p0sitional-secret" not in listed


# --- probes ------------------------------------------------------------------------------------


def test_health_and_ready(api: httpx.Client) -> None:
    sent_id(send(api, "math.add", 1, 2))
    health = api.get("/health")
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "ok"
    assert body["queues"]["default"]["counts"]["queued"] == 1
    assert "1, 2" not in health.text and "math.add" not in health.text  # counts only
    ready = api.get("/ready")
    assert ready.status_code == 200 and ready.json() == {"status": "ready"}
