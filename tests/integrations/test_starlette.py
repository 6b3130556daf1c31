"""The FastAPI/Starlette integration (``taskmill.integrations.starlette`` and ``.fastapi``):
the lifespan's order and checks driven through Starlette's own lifespan context, then a real
uvicorn server on a loopback port: a job sent from an endpoint runs on the embedded worker,
shutdown drains it (or hands it back past the drain timeout), and the mounted dashboard keeps
its auth."""

from __future__ import annotations

import base64
import json
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, WebSocket
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.websockets import WebSocketState
from websockets.sync.client import connect

from taskmill import App, JobState, current_job
from taskmill.errors import BrokerError, ConfigurationError
from taskmill.integrations.fastapi import TaskmillApp, TaskmillWorker
from taskmill.integrations.starlette import (
    dashboard_mount,
    forward_events,
    mount_dashboard,
    taskmill_app,
    taskmill_lifespan,
    taskmill_worker,
)
from taskmill.testing import wait_until
from taskmill.web import WebConfig

# --- the lifespan, through Starlette's lifespan context ----------------------------------------


class RecordingApp(App):
    """An App that notes when it is opened and closed."""

    def __init__(self, url: str, steps: list[str]) -> None:
        super().__init__(url)
        self.steps = steps

    async def aopen(self) -> App:
        self.steps.append("open")
        return await super().aopen()

    async def aclose(self) -> None:
        self.steps.append("close")
        await super().aclose()


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'jobs.db'}"


@pytest.mark.timeout(30)
async def test_the_lifespan_opens_runs_yours_starts_the_worker_and_undoes_it_in_reverse(
    tmp_path: Path,
) -> None:
    steps: list[str] = []
    tasks = RecordingApp(sqlite_url(tmp_path), steps)

    @tasks.task()
    def double(x: int) -> int:
        return 2 * x

    @asynccontextmanager
    async def mine(site: Starlette) -> AsyncIterator[dict[str, str]]:
        steps.append("mine: worker is " + repr(site.state.taskmill_worker))
        yield {"db": "pool"}
        steps.append(f"mine ends: worker running {site.state.taskmill_worker.running}")

    site = Starlette(lifespan=taskmill_lifespan(tasks, worker={"concurrency": 2}, then=mine))
    async with site.router.lifespan_context(site) as state:
        assert state == {"db": "pool"}  # your lifespan's state is the application's
        assert site.state.taskmill is tasks
        assert site.state.taskmill_worker.running
        handle = await double.asend(21)
        assert await handle.aresult(timeout=10) == 42
        steps.append("serving")
    assert steps == [
        "open",
        "mine: worker is None",  # yours starts before the worker: its jobs may need yours
        "serving",
        "mine ends: worker running False",  # the worker drained before yours ends
        "close",
    ]


@pytest.mark.timeout(30)
async def test_the_lifespan_runs_again_after_it_ended(tmp_path: Path) -> None:
    tasks = App(sqlite_url(tmp_path))

    @tasks.task()
    async def square(x: int) -> int:
        return x * x

    site = Starlette(lifespan=taskmill_lifespan(tasks, worker=True))
    workers = []
    for x in (3, 4):
        async with site.router.lifespan_context(site):
            workers.append(site.state.taskmill_worker)
            assert await (await square.asend(x)).aresult(timeout=10) == x * x
    first, second = workers
    assert first is not second and not first.running and not second.running


@pytest.mark.timeout(30)
async def test_a_failing_startup_of_yours_still_closes_the_app(tmp_path: Path) -> None:
    steps: list[str] = []
    tasks = RecordingApp(sqlite_url(tmp_path), steps)

    @asynccontextmanager
    async def broken(site: Starlette) -> AsyncIterator[None]:
        raise RuntimeError("no database")
        yield

    site = Starlette(lifespan=taskmill_lifespan(tasks, worker=True, then=broken))
    with pytest.raises(RuntimeError, match="no database"):
        async with site.router.lifespan_context(site):
            pass
    assert steps == ["open", "close"]
    assert site.state.taskmill_worker is None  # never started


@pytest.mark.timeout(30)
async def test_without_a_worker_the_app_is_open_and_no_worker_runs(tmp_path: Path) -> None:
    tasks = App(sqlite_url(tmp_path))

    @tasks.task()
    def noop() -> None: ...

    site = Starlette(lifespan=taskmill_lifespan(tasks))
    async with site.router.lifespan_context(site):
        assert site.state.taskmill_worker is None
        handle = await noop.asend()
        assert await handle.astatus() is JobState.QUEUED  # stored; nothing here runs it


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"worker": {"concurency": 8}}, ConfigurationError, "unknown worker option.*concurency"),
        ({"worker": {"queues": "mail"}}, ConfigurationError, r"queues=\['mail'\]"),
        ({"worker": {"concurrency": 0}}, ValueError, "concurrency must be >= 1"),
        ({"worker": {"pool": "process"}}, ValueError, "needs app_path"),
        ({"worker": "yes"}, ConfigurationError, "worker= is True, False, or a mapping"),
        ({"then": 42}, ConfigurationError, "then= is your own lifespan"),
    ],
)
@pytest.mark.timeout(10)
def test_bad_options_fail_when_the_lifespan_is_made(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    tasks = App("memory://")
    with pytest.raises(error, match=message):
        taskmill_lifespan(tasks, **kwargs)


@pytest.mark.timeout(10)
def test_the_lifespan_needs_a_taskmill_app() -> None:
    with pytest.raises(ConfigurationError, match="needs a taskmill App, not str"):
        taskmill_lifespan("sqlite:///jobs.db")  # type: ignore[arg-type]


@pytest.mark.timeout(30)
async def test_the_dependencies_say_what_is_missing(tmp_path: Path) -> None:
    tasks = App(sqlite_url(tmp_path))
    plain = FastAPI()  # no taskmill lifespan
    served = FastAPI(lifespan=taskmill_lifespan(tasks))  # no worker
    for api in (plain, served):

        @api.get("/app")
        async def app_route(app: TaskmillApp) -> str:
            return app.url

        @api.get("/worker")
        async def worker_route(worker: TaskmillWorker) -> bool:
            return worker.healthy

    async with client_of(plain) as client:
        with pytest.raises(RuntimeError, match=r"lifespan=taskmill_lifespan\(app, \.\.\.\)"):
            await client.get("/app")
    async with served.router.lifespan_context(served), client_of(served) as client:
        assert (await client.get("/app")).json() == tasks.url
        with pytest.raises(RuntimeError, match="runs no taskmill worker: pass worker=True"):
            await client.get("/worker")


@asynccontextmanager
async def client_of(api: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=api)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


@pytest.mark.parametrize("path", ["tasks", "/tasks/", "/", "//tasks"])
@pytest.mark.timeout(10)
def test_a_prefix_that_would_not_route_is_refused(path: str) -> None:
    tasks = App("memory://")
    with pytest.raises(ConfigurationError, match="starts with '/' and does not end with one"):
        mount_dashboard(Starlette(), tasks, path)
    with pytest.raises(ConfigurationError, match="starts with '/'"):
        dashboard_mount(tasks, path)


# --- a real server -----------------------------------------------------------------------------


@contextmanager
def serving(asgi: Any, *, graceful_s: float = 5) -> Iterator[Served]:
    """Serve ``asgi`` with its lifespan under uvicorn on a loopback port the OS picked (bound
    here, so nothing takes it between choosing and listening), on a thread of this process."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        asgi,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=graceful_s,
    )
    served = Served(f"http://127.0.0.1:{port}", uvicorn.Server(config))
    served.thread = threading.Thread(
        target=served.run, args=(sock,), name=f"uvicorn-{port}", daemon=True
    )
    served.thread.start()
    try:
        wait_until(lambda: served.server.started or not served.thread.is_alive(), timeout=20,
                   what="uvicorn to start")  # fmt: skip
        assert served.server.started, f"uvicorn did not start: {served.errors}"
        yield served
    finally:
        served.stop()


class Served:
    """A uvicorn server on a thread; ``stop()`` runs its shutdown (the lifespan's too)."""

    def __init__(self, url: str, server: uvicorn.Server) -> None:
        self.url = url
        self.server = server
        self.thread = threading.Thread()
        self.errors: list[BaseException] = []

    def run(self, sock: socket.socket) -> None:
        try:
            self.server.run(sockets=[sock])
        except BaseException as exc:  # reported by whoever waits for the server
            self.errors.append(exc)
        finally:
            sock.close()

    def stop(self, timeout: float = 30) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"uvicorn did not stop within {timeout} s"


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def fastapi_site(tasks: App, **lifespan: Any) -> tuple[FastAPI, Callable[..., Any]]:
    """A FastAPI app with the lifespan, a send endpoint, a result endpoint, a health route
    and the dashboard under /tasks; also the task its endpoint sends."""

    @tasks.task()
    def double(x: int) -> int:
        return 2 * x

    api = FastAPI(lifespan=taskmill_lifespan(tasks, **lifespan))
    mount_dashboard(api, tasks, "/tasks", WebConfig(users={"ops": "a long secret"}))

    @api.post("/double/{x}")
    async def send_double(x: int) -> dict[str, str]:
        handle = await double.asend(x)
        return {"job": handle.id}

    @api.get("/jobs/{job_id}/result")
    async def result(job_id: str, app: TaskmillApp) -> dict[str, Any]:
        return {"result": await app.job(job_id).aresult(timeout=10)}

    @api.get("/healthz")
    async def healthz(worker: TaskmillWorker) -> dict[str, bool]:
        return {"worker": worker.healthy}

    return api, double


@pytest.mark.timeout(60)
def test_a_job_sent_from_an_endpoint_runs_on_the_embedded_worker(tmp_path: Path) -> None:
    tasks = App(sqlite_url(tmp_path))
    api, _ = fastapi_site(tasks, worker={"concurrency": 4, "name": "web"})
    with serving(api) as served, httpx.Client(base_url=served.url, timeout=20) as http:
        job_id = http.post("/double/21").json()["job"]
        assert http.get(f"/jobs/{job_id}/result").json() == {"result": 42}
        assert http.get("/healthz").json() == {"worker": True}
        # the dashboard's API under the prefix names the worker that ran it
        job = http.get(f"/tasks/api/v1/jobs/{job_id}", headers=basic("ops", "a long secret"))
        assert job.status_code == 200, job.text
        assert job.json()["state"] == "succeeded"
        assert job.json()["worker_id"].startswith("web@")
    assert not api.state.taskmill_worker.running


@pytest.mark.timeout(60)
def test_the_mounted_dashboard_keeps_its_auth(tmp_path: Path) -> None:
    tasks = App(sqlite_url(tmp_path))
    api, _ = fastapi_site(tasks)
    with serving(api) as served, httpx.Client(base_url=served.url, timeout=20) as http:
        refused = http.get("/tasks/api/v1/queues")
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"].startswith("Basic")
        wrong = http.get("/tasks/api/v1/queues", headers=basic("ops", "a wrong secret"))
        assert wrong.status_code == 401
        page = http.get("/tasks/", headers=basic("ops", "a long secret"))
        assert page.status_code == 200
        assert f'href="{served.url}/tasks/jobs"' in page.text  # its links stay under it
        # the host application's own routes are not behind the dashboard's auth
        assert http.post("/double/1").status_code == 200


@pytest.mark.timeout(60)
def test_without_auth_only_loopback_clients_reach_the_mounted_dashboard(tmp_path: Path) -> None:
    tasks = App(sqlite_url(tmp_path))

    async def status(request: Request) -> JSONResponse:  # Starlette: call the accessors
        worker = taskmill_worker(request)
        return JSONResponse({"url": taskmill_app(request).url, "worker": worker.healthy})

    site = Starlette(
        lifespan=taskmill_lifespan(tasks, worker=True),
        routes=[
            Route("/status", status),
            dashboard_mount(tasks, "/ops/taskmill", WebConfig()),
        ],
    )
    with serving(site) as served, httpx.Client(base_url=served.url, timeout=20) as http:
        # healthy from startup on, whether or not its first heartbeat came yet
        assert http.get("/status").json() == {"url": tasks.url, "worker": True}
        assert http.get("/ops/taskmill/api/v1/queues").status_code == 200
        # a client behind a proxy on this host: uvicorn trusts the loopback proxy's header,
        # so the dashboard sees the real client, and refuses it
        proxied = http.get(
            "/ops/taskmill/api/v1/queues", headers={"X-Forwarded-For": "203.0.113.9"}
        )
        assert proxied.status_code == 403
        assert "only loopback clients" in proxied.json()["error"]


def drained_site(
    tasks: App, release: threading.Event, drain_timeout_s: float
) -> tuple[Starlette, threading.Event, Callable[..., Any]]:
    """A Starlette app whose lifespan nests taskmill's in its own (the documented form) and
    says when its shutdown began, before taskmill's drain; and a task that runs until
    ``release`` is set."""
    shutdown_began = threading.Event()

    @tasks.task(retries=0)
    def held() -> str:
        assert release.wait(30), "the test never released the job"
        return "done"

    inner = taskmill_lifespan(tasks, worker={"drain_timeout_s": drain_timeout_s})

    @asynccontextmanager
    async def lifespan(site: Starlette) -> AsyncIterator[None]:
        async with inner(site):
            yield
            shutdown_began.set()  # the worker is told to stop right after, in this same step

    return Starlette(lifespan=lifespan), shutdown_began, held


@pytest.mark.timeout(60)
def test_shutdown_drains_a_running_job(tmp_path: Path) -> None:
    tasks = App(sqlite_url(tmp_path))
    release = threading.Event()
    site, shutdown_began, held = drained_site(tasks, release, drain_timeout_s=30)
    with serving(site) as served:
        handle = held.send()
        wait_until(lambda: handle.status() is JobState.RUNNING, timeout=20,
                   what="the job to start")  # fmt: skip
        stopper = threading.Thread(target=served.stop)
        stopper.start()
        assert shutdown_began.wait(20), "the server's shutdown did not begin"
        release.set()  # only now: the job ends while the worker drains
        stopper.join(30)
        assert not stopper.is_alive()
    job = handle.info()
    assert (job.state, handle.result(timeout=5), job.attempt) == (JobState.SUCCEEDED, "done", 1)
    tasks.close()


@pytest.mark.timeout(60)
def test_shutdown_hands_back_a_job_still_running_after_the_drain_timeout(tmp_path: Path) -> None:
    tasks = App(sqlite_url(tmp_path))
    release = threading.Event()
    site, shutdown_began, held = drained_site(tasks, release, drain_timeout_s=0.5)
    try:
        with serving(site):
            handle = held.send()
            wait_until(lambda: handle.status() is JobState.RUNNING, timeout=20,
                       what="the job to start")  # fmt: skip
        assert shutdown_began.is_set()
        job = handle.info()
        # handed back without spending its only attempt: the next worker runs it
        assert (job.state, job.attempt) == (JobState.QUEUED, 0)
    finally:
        release.set()  # let the abandoned thread of the old worker end
        tasks.close()


# --- events over a WebSocket -------------------------------------------------------------------


def events_site(tasks: App, left: threading.Event) -> FastAPI:
    api = FastAPI(lifespan=taskmill_lifespan(tasks, worker={"concurrency": 2}))

    @api.websocket("/jobs/{job_id}/events")
    async def job_events(websocket: WebSocket, job_id: str, app: TaskmillApp) -> None:
        await websocket.accept()
        sent = await forward_events(websocket, app.job(job_id).awatch())
        if websocket.client_state is WebSocketState.CONNECTED:
            await websocket.close()
        if sent:
            left.set()

    return api


@pytest.mark.timeout(60)
def test_a_jobs_events_reach_a_websocket_client_until_it_finishes(tmp_path: Path) -> None:
    tasks = App(sqlite_url(tmp_path), events=True)
    go = threading.Event()

    @tasks.task()
    def render(frames: int) -> str:
        assert go.wait(30), "the test never let the job go"
        job = current_job()
        for i in range(frames):
            job.progress((i + 1) / frames, f"frame {i + 1}")
        return "video.mp4"

    left = threading.Event()
    with serving(events_site(tasks, left)) as served:
        handle = render.send(3)
        url = served.url.replace("http://", "ws://") + f"/jobs/{handle.id}/events"
        received: list[dict[str, Any]] = []
        with connect(url, open_timeout=10) as ws:
            first = json.loads(ws.recv(timeout=10))  # the job's state now: nothing after is missed
            go.set()
            received.append(first)
            # iterating ends when the server closes normally (an error would raise)
            received += [json.loads(message) for message in ws]
    states = [e["state"] for e in received if e["progress"] is None]
    assert states[0] in ("queued", "running") and states[-1] == "succeeded"
    progress = [(e["progress"], e["message"]) for e in received if e["progress"] is not None]
    assert progress and progress[-1] == (1.0, "frame 3")  # at most 10 a second: the last kept
    assert {e["job_id"] for e in received} == {handle.id}
    assert set(received[0]) >= {"task", "queue", "attempt", "seq", "workflow_id"}
    assert "result" not in received[-1] and "args" not in received[-1]
    assert left.is_set()
    tasks.close()


@pytest.mark.timeout(60)
def test_a_client_that_leaves_ends_the_forwarding_at_once(tmp_path: Path) -> None:
    tasks = App(sqlite_url(tmp_path), events=True)
    release = threading.Event()

    @tasks.task()
    def held() -> None:
        assert release.wait(30), "the test never released the job"

    left = threading.Event()
    try:
        with serving(events_site(tasks, left)) as served:
            handle = held.send()
            url = served.url.replace("http://", "ws://") + f"/jobs/{handle.id}/events"
            with connect(url, open_timeout=10) as ws:
                assert json.loads(ws.recv(timeout=10))["job_id"] == handle.id
            # the job still runs, so only the client's leaving can end the forwarding
            assert left.wait(10), "forward_events did not return after the client left"
            assert handle.status() in (JobState.QUEUED, JobState.RUNNING)
            release.set()
    finally:
        release.set()
        tasks.close()


@pytest.mark.timeout(30)
async def test_a_broker_that_cannot_be_opened_fails_the_startup(tmp_path: Path) -> None:
    (tmp_path / "not-a-dir").write_text("a file where the database's directory should be")
    steps: list[str] = []
    tasks = RecordingApp(f"sqlite:///{tmp_path / 'not-a-dir' / 'jobs.db'}", steps)
    site = Starlette(lifespan=taskmill_lifespan(tasks, worker=True))
    with pytest.raises(BrokerError, match=r"not-a-dir/jobs\.db: .*not-a-dir is a file"):
        async with site.router.lifespan_context(site):
            pytest.fail("the server must not serve")
    assert steps == ["open", "close"]
    assert site.state.taskmill_worker is None
