"""The Flask extension: config, sends from views, tasks in the app context, the command group,
an embedded worker, and a real ``flask taskmill worker`` process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, Response, current_app, jsonify

from taskmill import App, JobState
from taskmill.admin import WorkerStatus
from taskmill.errors import ConfigurationError
from taskmill.integrations.flask import EXTENSION_KEY, FlaskTask, Taskmill, current_taskmill
from taskmill.testing import wait_until


def make_flask(name: str = "shop", **config: Any) -> Flask:
    flask_app = Flask(name)
    flask_app.config.update(config)
    return flask_app


@pytest.fixture
def closing() -> Iterator[list[App]]:
    """Apps to close at the end of the test."""
    apps: list[App] = []
    yield apps
    for app in apps:
        app.close()


# --- configuration ------------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_url_and_settings_come_from_the_flask_config(tmp_path: Path, closing: list[App]) -> None:
    url = f"sqlite:///{tmp_path}/jobs.db"
    flask_app = make_flask(
        TASKMILL_URL=url, TASKMILL_LEASE_S=5, TASKMILL_DEFAULT_QUEUE="web", TASKMILL_EVENTS=True
    )
    Taskmill(flask_app)
    app = flask_app.extensions[EXTENSION_KEY]
    closing.append(app)
    assert isinstance(app, App)
    assert (app.url, app.settings.lease_s) == (url, 5)
    assert (app.settings.default_queue, app.settings.events) == ("web", True)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"TASKMILL_LEASE": 5}, "unknown taskmill config key(s) ['TASKMILL_LEASE']"),
        ({"TASKMILL_LEASE_S": "5"}, "TASKMILL_LEASE_S must be a number, not '5'"),
        ({"TASKMILL_EVENTS": 1}, "TASKMILL_EVENTS must be True or False, not 1"),
        ({"TASKMILL_HEARTBEAT_S": "x"}, "TASKMILL_HEARTBEAT_S must be a number or None"),
        ({"TASKMILL_URL": 42}, "TASKMILL_URL must be a broker URL string, not 42"),
        (
            {"TASKMILL_LEASE_S": 2, "TASKMILL_HEARTBEAT_S": 3},
            "heartbeat_s must be > 0 and shorter than lease_s",
        ),
    ],
)
def test_bad_config_is_refused_naming_the_key(config: dict[str, Any], message: str) -> None:
    flask_app = make_flask(**config)
    with pytest.raises(ConfigurationError) as info:
        Taskmill(flask_app)
    assert message in str(info.value)
    assert EXTENSION_KEY not in flask_app.extensions  # nothing half made


@pytest.mark.timeout(10)
def test_init_app_twice_is_an_error(closing: list[App]) -> None:
    flask_app = make_flask(TASKMILL_URL="memory://")
    ext = Taskmill(flask_app)
    closing.append(ext.get_app(flask_app))
    with pytest.raises(ConfigurationError, match="init_app twice"):
        Taskmill().init_app(flask_app)


@pytest.mark.timeout(10)
def test_a_bad_task_option_fails_at_the_declaration() -> None:
    ext = Taskmill()
    with pytest.raises(ConfigurationError, match="unknown priority 'soonish'"):

        @ext.task(priority="soonish")
        def late() -> None: ...

    with pytest.raises(TypeError):
        ext.task(retires=3)(lambda: None)


# --- the App from views, sends, the app context in jobs ----------------------------------------


@pytest.mark.timeout(10)
def test_the_app_is_reachable_only_inside_an_app_context(closing: list[App]) -> None:
    ext = Taskmill()

    @ext.task
    def ping() -> str:
        return "pong"

    flask_app = make_flask(TASKMILL_URL="memory://")
    ext.init_app(flask_app)
    closing.append(ext.get_app(flask_app))
    with flask_app.app_context():
        assert current_taskmill.url == "memory://"
        assert ext.get_app() is flask_app.extensions[EXTENSION_KEY]
        assert ping.task.name in current_taskmill.tasks
    with pytest.raises(RuntimeError, match="app_context"):
        ping.send()
    with pytest.raises(RuntimeError, match="no taskmill App"):
        ext.get_app(make_flask("other"))


@pytest.mark.timeout(10)
def test_jobs_run_inside_the_flask_app_context(closing: list[App]) -> None:
    ext = Taskmill()

    @ext.task(retries=0)
    def greeting(name: str) -> str:
        return f"{current_app.config['GREETING']}, {name}"

    @ext.task(retries=0)
    async def shout(name: str) -> str:
        return f"{current_app.config['GREETING'].upper()}, {name.upper()}"

    flask_app = make_flask(TASKMILL_URL="memory://?eager=1", GREETING="hello")
    ext.init_app(flask_app)
    closing.append(ext.get_app(flask_app))

    @flask_app.post("/greet/<name>")
    def greet(name: str) -> Response:
        return jsonify(
            plain=greeting.send(name).result(timeout=5), loud=shout.send(name).result(timeout=5)
        )

    response = flask_app.test_client().post("/greet/ada")
    assert response.status_code == 200
    assert response.json == {"plain": "hello, ada", "loud": "HELLO, ADA"}


@pytest.mark.timeout(10)
def test_each_flask_app_sends_through_its_own_taskmill_app(
    tmp_path: Path, closing: list[App]
) -> None:
    ext = Taskmill()

    @ext.task
    def record(n: int) -> int:
        return n

    apps = [make_flask(f"a{i}", TASKMILL_URL=f"sqlite:///{tmp_path}/{i}.db") for i in range(2)]
    for flask_app in apps:
        ext.init_app(flask_app)
        closing.append(ext.get_app(flask_app))
    with apps[1].app_context():
        handle = record.send(7)
    assert ext.get_app(apps[1]).get_job(handle.id).state is JobState.QUEUED
    assert ext.get_app(apps[0]).list_jobs().total == 0


@pytest.mark.timeout(10)
def test_tasks_declared_after_init_app_are_registered_too(closing: list[App]) -> None:
    flask_app = make_flask(TASKMILL_URL="memory://?eager=1")
    ext = Taskmill(flask_app)
    closing.append(ext.get_app(flask_app))

    @ext.task
    def later(x: int) -> int:
        return x + 1

    @ext.periodic(every=3600)
    @ext.task
    def hourly() -> None: ...

    assert isinstance(later, FlaskTask)
    with flask_app.app_context():
        assert later.send(1).result(timeout=5) == 2
        assert hourly.name in current_taskmill.schedules
    assert later(41) == 42  # calling it still calls the function


@pytest.mark.timeout(30)
def test_an_embedded_worker_runs_what_a_view_sends(tmp_path: Path, closing: list[App]) -> None:
    ext = Taskmill()

    @ext.task(retries=0)
    def total(prices: list[int]) -> int:
        vat: int = current_app.config["VAT"]
        return sum(prices) * vat

    flask_app = make_flask(TASKMILL_URL=f"sqlite:///{tmp_path}/jobs.db", VAT=2)
    ext.init_app(flask_app)
    closing.append(ext.get_app(flask_app))

    @flask_app.post("/orders")
    def order() -> Response:
        return jsonify(job=total.send([1, 2, 3]).id)

    @flask_app.get("/orders/<job_id>")
    def order_status(job_id: str) -> Response:
        job = current_taskmill.get_job(job_id)
        return jsonify(state=job.state.value)

    worker = ext.start_worker(flask_app, concurrency=2, name="web")
    try:
        client = flask_app.test_client()
        job_id = client.post("/orders").get_json()["job"]
        wait_until(
            lambda: client.get(f"/orders/{job_id}").get_json()["state"] == "succeeded",
            what="the order job to succeed",
            timeout=20,
        )
        assert ext.get_app(flask_app).job(job_id).result(timeout=5) == 12
    finally:
        worker.stop(timeout=20)
    assert not worker.running


# --- the CLI as a Flask command group ----------------------------------------------------------


@pytest.mark.timeout(20)
def test_the_cli_group_is_bound_to_the_flask_apps_taskmill_app(
    tmp_path: Path, closing: list[App]
) -> None:
    ext = Taskmill()

    @ext.task(queue="mail", retries=0)
    def notify(user: int) -> None: ...

    flask_app = make_flask(TASKMILL_URL=f"sqlite:///{tmp_path}/jobs.db")
    ext.init_app(flask_app)
    closing.append(ext.get_app(flask_app))
    with flask_app.app_context():
        handle = notify.send(3)
    runner = flask_app.test_cli_runner()

    listed = runner.invoke(args=["taskmill", "jobs", "list"])
    assert listed.exit_code == 0, listed.output
    assert handle.id in listed.output

    tasks = runner.invoke(args=["taskmill", "tasks"])
    assert tasks.exit_code == 0, tasks.output
    assert notify.name in tasks.output

    missing = runner.invoke(args=["taskmill", "jobs", "show", "no-such-job"])
    assert missing.exit_code == 1
    assert "no-such-job" in missing.output
    assert "Traceback" not in missing.output


def test_the_cli_group_shares_taskmills_commands() -> None:
    from taskmill.cli import cli

    flask_app = make_flask(TASKMILL_URL="memory://")
    ext = Taskmill(flask_app, cli_group="jobs-cli")
    try:
        group = flask_app.cli.commands["jobs-cli"]
        assert group.commands["worker"] is cli.commands["worker"]  # type: ignore[attr-defined]
    finally:
        ext.get_app(flask_app).close()
    bare = make_flask(TASKMILL_URL="memory://")
    Taskmill(bare, cli_group=None).get_app(bare).close()
    assert "taskmill" not in bare.cli.commands


FLASK_APP_MODULE = """
from flask import Flask, current_app

from taskmill.integrations.flask import Taskmill

tasks = Taskmill()


@tasks.task(retries=0)
def label(n: int) -> str:
    return f"{current_app.config['PREFIX']}-{n}"


def create_app() -> Flask:
    flask_app = Flask(__name__)
    flask_app.config.from_prefixed_env()
    flask_app.config["PREFIX"] = "item"
    tasks.init_app(flask_app)
    return flask_app
"""


@pytest.mark.timeout(60)
def test_flask_taskmill_worker_runs_jobs_in_real_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = f"flaskjobs_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(FLASK_APP_MODULE))
    url = f"sqlite:///{tmp_path}/jobs.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TASKMILL_", "FLASK_"))}
    env |= {"FLASK_TASKMILL_URL": url, "PYTHONPATH": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    monkeypatch.setenv("FLASK_TASKMILL_URL", url)  # the same config in this process
    log_path = tmp_path / "worker.log"
    sys.path.insert(0, str(tmp_path))
    try:
        factory = __import__(module).create_app
        flask_app: Flask = factory()
        app = flask_app.extensions[EXTENSION_KEY]
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "flask", "--app", f"{module}:create_app", "taskmill",
                 "worker", "-c", "2", "-p", "2", "--name", "flaskworker"],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
            )  # fmt: skip
            try:
                with flask_app.app_context():
                    label = __import__(module).label
                    handles = [label.send(n) for n in range(3)]
                results = [h.result(timeout=30) for h in handles]
                assert results == ["item-0", "item-1", "item-2"]
                # -p 2: two child processes, each of which loaded the Flask app again
                children = wait_until(
                    lambda: _registered(app, "flaskworker@", 2),
                    what="both child processes to register",
                    timeout=20,
                )
                assert proc.pid not in {w.pid for w in children}
            finally:
                proc.send_signal(signal.SIGTERM)
                code = proc.wait(timeout=30)
        assert code == 0, log_path.read_text()
        app.close()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(module, None)


def _registered(app: App, prefix: str, count: int) -> list[WorkerStatus] | None:
    """The workers whose id starts with ``prefix``, once there are ``count`` of them."""
    found = [w for w in app.workers() if w.id.startswith(prefix)]
    return found if len(found) == count else None


EXITING_SCRIPT = """
import sys

from flask import Flask

from taskmill.integrations.flask import Taskmill

tasks = Taskmill()


@tasks.task(retries=0)
def square(n: int) -> int:
    return n * n


flask_app = Flask("exiting")
flask_app.config["TASKMILL_URL"] = sys.argv[1]
tasks.init_app(flask_app)
worker = tasks.start_worker(flask_app, concurrency=2, name="exiting")
with flask_app.app_context():
    print(square.send(7).result(timeout=20), flush=True)
# no stop(), no close(): the extension drains the worker and closes the App at exit
"""


@pytest.mark.timeout(60)
def test_the_worker_stops_and_the_app_closes_at_exit(tmp_path: Path) -> None:
    script = tmp_path / "exiting.py"
    script.write_text(textwrap.dedent(EXITING_SCRIPT))
    url = f"sqlite:///{tmp_path}/jobs.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKMILL_")}
    done = subprocess.run(
        [sys.executable, str(script), url], capture_output=True, text=True, env=env, timeout=50
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "49"
    assert "Exception ignored" not in done.stderr, done.stderr
    with App(url) as app:
        assert app.workers() == []  # the worker signed off: it drained, it was not abandoned


def test_the_childrens_app_path_outside_flask_taskmill_worker_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import taskmill.integrations.flask as integration

    monkeypatch.delenv("TASKMILL_FLASK_APP", raising=False)
    with pytest.raises(ConfigurationError, match="child processes of 'flask taskmill worker'"):
        integration.cli_app  # noqa: B018 (the module attribute is made on access)
    with pytest.raises(AttributeError, match="no_such_thing"):
        integration.no_such_thing  # noqa: B018


TYPED_SENDS = """
from taskmill import JobHandle
from taskmill.integrations.flask import Taskmill

ext = Taskmill()


@ext.task
def add(a: int, b: int) -> int:
    return a + b


@ext.task(retries=1)
async def greet(name: str) -> str:
    return name


def correct() -> None:
    h: JobHandle[int] = add.send(1, 2)
    g: JobHandle[str] = greet.send("ada")


def wrong() -> None:
    add.send("one", 2)
    greet.send(name=3)
"""


@pytest.mark.timeout(120)
def test_sends_of_declared_tasks_are_type_checked(tmp_path: Path) -> None:
    module = tmp_path / "typed_sends.py"
    module.write_text(TYPED_SENDS)
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(module)],
        capture_output=True,
        text=True,
        timeout=110,
    )
    errors = [line for line in done.stdout.splitlines() if ": error:" in line]
    lines = sorted(int(line.split(":")[1]) for line in errors)
    assert lines == [24, 25], done.stdout
