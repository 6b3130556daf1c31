"""``taskmill worker --metrics-port``: the worker-side Prometheus metrics, with real worker
processes on SQLite. One endpoint counts every process of ``-p 2``; a child killed and
restarted neither loses nor doubles what was counted; no label carries a job id; the
supervisor removes its directory of counts when it exits.

Counts are published once a second, so every check polls the endpoint until a deadline.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from servers import free_port
from taskmill import App, JobState
from taskmill.testing import wait_until

from .support import Workers, all_jobs

APP = "metrics_app:app"
LABELS = {"queue", "task", "outcome", "le"}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/jobs.db"


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    w = Workers(tmp_path, APP)
    try:
        yield w
    finally:
        w.close()


@pytest.fixture
def producer(url: str) -> Iterator[App]:
    app = App(url)  # no tasks: send_task stores jobs by name, as given
    try:
        yield app
    finally:
        app.close()


def scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as reply:
            text: str = reply.read().decode()
            return text
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def parse(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def counts(got: Samples, name: str) -> dict[tuple[str, ...], float]:
    """The samples of one name, by their label values (sorted by label name)."""
    return {tuple(v for _, v in labels): value for (n, labels), value in got.items() if n == name}


def wait_counts(port: int, want: dict[str, dict[tuple[str, ...], float]], what: str) -> Samples:
    """Scrape until every sample named in ``want`` has exactly the values given."""
    last: list[Samples] = [{}]

    def check() -> Samples | None:
        text = scrape(port)
        if text is None:
            return None
        got = last[0] = parse(text)
        return got if all(counts(got, n) == v for n, v in want.items()) else None

    def describe() -> str:
        return f"{what}: { ({n: counts(last[0], n) for n in want}) }"

    return wait_until(check, what=describe, timeout=30, interval=0.2)


def alive_pids(app: App, n: int) -> set[int]:
    def check() -> set[int] | None:
        pids = {w.pid for w in app.workers() if not w.lost}
        return pids if len(pids) == n else None

    return wait_until(check, what=f"{n} alive workers", timeout=30)


def drained(app: App, finished: int) -> None:
    def check() -> bool:
        counts = {s.queue: s.counts for s in app.stats()}
        done = sum(c["succeeded"] + c["failed"] for c in counts.values())
        waiting = sum(c["queued"] + c["scheduled"] + c["running"] for c in counts.values())
        return done == finished and waiting == 0

    wait_until(check, what=f"{finished} jobs to finish", timeout=60)


@pytest.mark.timeout(120)
def test_one_endpoint_counts_the_jobs_of_every_worker_process(
    tmp_path: Path, url: str, workers: Workers, producer: App
) -> None:
    port = free_port()
    supervisor = workers.start(url, "-p", "2", "-c", "1", "--metrics-port", str(port))
    alive_pids(producer, 2)
    release = tmp_path / "release"
    # -c 1: each process takes one of the two holds, so both processes run jobs
    holds = [producer.send_task("meter.hold", [str(release)]).id for _ in range(2)]

    def both_running() -> set[str] | None:
        jobs = [producer.get_job(h) for h in holds]
        owners = {j.worker_id for j in jobs if j.state is JobState.RUNNING and j.worker_id}
        return owners if len(owners) == 2 else None

    wait_until(
        both_running,
        what=lambda: f"the two holds running on two processes:\n{workers.output()}",
        timeout=30,
    )
    release.touch()
    for n in range(20):
        producer.send_task("meter.ok", [n])
    producer.send_task("meter.bad", queue="slow")
    producer.send_task("meter.flaky", retries=1)  # a producer without the task: say it
    producer.send_task("meter.fanout", [5])  # sends 5 meter.ok from inside a worker
    drained(producer, 2 + 20 + 1 + 1 + 1 + 5)

    default = "default"
    got = wait_counts(
        port,
        {
            "taskmill_worker_jobs_started_total": {
                (default, "meter.hold"): 2, (default, "meter.ok"): 25, ("slow", "meter.bad"): 1,
                (default, "meter.flaky"): 2, (default, "meter.fanout"): 1,
            },
            "taskmill_worker_jobs_finished_total": {
                ("succeeded", default, "meter.hold"): 2, ("succeeded", default, "meter.ok"): 25,
                ("failed", "slow", "meter.bad"): 1, ("retried", default, "meter.flaky"): 1,
                ("succeeded", default, "meter.flaky"): 1, ("succeeded", default, "meter.fanout"): 1,
            },
            "taskmill_worker_jobs_enqueued_total": {(default, "meter.ok"): 5},
            "taskmill_worker_job_run_seconds_count": {
                (default, "meter.hold"): 2, (default, "meter.ok"): 25, ("slow", "meter.bad"): 1,
                (default, "meter.flaky"): 2, (default, "meter.fanout"): 1,
            },
            "taskmill_worker_job_queue_wait_seconds_count": {
                (default, "meter.hold"): 2, (default, "meter.ok"): 25, ("slow", "meter.bad"): 1,
                (default, "meter.flaky"): 2, (default, "meter.fanout"): 1,
            },
        },
        "every job of both processes counted once",
    )  # fmt: skip
    # the holds ran until released: their run time is in the sum, and in no bucket below it
    hold_sum = got[
        ("taskmill_worker_job_run_seconds_sum", (("queue", default), ("task", "meter.hold")))
    ]
    assert hold_sum > 0
    inf = got[
        (
            "taskmill_worker_job_run_seconds_bucket",
            (("le", "+Inf"), ("queue", default), ("task", "meter.ok")),
        )
    ]
    assert inf == 25

    ids = set(all_jobs(producer))
    for (_, labels), _value in got.items():
        assert {k for k, _ in labels} <= LABELS, labels
        assert not ids & {v for _, v in labels}, f"a job id as a label: {labels}"

    (directory,) = re.findall(r"write their counts to (\S+)", workers.output())
    assert Path(directory).is_dir()
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=30) == 0, workers.output()
    assert not Path(directory).exists(), "the supervisor left its directory of counts behind"


@pytest.mark.timeout(120)
def test_a_child_killed_and_restarted_neither_loses_nor_doubles_the_counts(
    url: str, workers: Workers, producer: App
) -> None:
    port = free_port()
    supervisor = workers.start(url, "-p", "2", "-c", "2", "--metrics-port", str(port))
    before = alive_pids(producer, 2)
    for n in range(10):
        producer.send_task("meter.ok", [n])
    drained(producer, 10)
    ten = {"taskmill_worker_jobs_finished_total": {("succeeded", "default", "meter.ok"): 10}}
    wait_counts(port, ten, "the first 10 jobs counted")

    victim = min(before)
    os.kill(victim, signal.SIGKILL)

    def restarted() -> set[int] | None:
        pids = {w.pid for w in producer.workers() if not w.lost and w.pid != victim}
        return pids if len(pids) == 2 and pids != before - {victim} else None

    wait_until(restarted, what="the killed process to be replaced", timeout=30)
    # the killed child's last counts are kept once; the survivor's are untouched
    wait_counts(port, ten, "the same 10 after the restart")
    for n in range(10):
        producer.send_task("meter.ok", [n])
    drained(producer, 20)
    twenty = {
        "taskmill_worker_jobs_finished_total": {("succeeded", "default", "meter.ok"): 20},
        "taskmill_worker_jobs_started_total": {("default", "meter.ok"): 20},
    }
    wait_counts(port, twenty, "20 after 10 more")
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=30) == 0, workers.output()


@pytest.mark.timeout(60)
def test_one_worker_process_serves_its_own_counts(
    url: str, workers: Workers, producer: App
) -> None:
    port = free_port()
    worker = workers.start(url, "--metrics-port", str(port))
    for n in range(3):
        producer.send_task("meter.ok", [n])
    wait_counts(
        port,
        {"taskmill_worker_jobs_finished_total": {("succeeded", "default", "meter.ok"): 3}},
        "the single process's 3 jobs",
    )
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0, workers.output()


def cli_env(url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKMILL_")}
    env["TASKMILL_URL"] = url
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent)
    return env


def test_a_taken_metrics_port_is_a_clear_error(tmp_path: Path, url: str) -> None:
    port = free_port()
    env = cli_env(url)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        r = subprocess.run(
            [sys.executable, "-m", "taskmill", "worker", "--app", APP, "--metrics-port", str(port)],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=30,
        )  # fmt: skip
    assert r.returncode == 1
    assert f"--metrics-port: cannot listen on 127.0.0.1:{port}" in r.stderr, r.stderr


@pytest.mark.parametrize("processes", ["1", "2"])
def test_metrics_without_prometheus_client_say_what_to_install(
    tmp_path: Path, url: str, processes: str
) -> None:
    # the package hidden as if not installed; only --metrics-port needs it
    code = (
        "import sys; sys.modules['prometheus_client'] = None; "
        "from taskmill.cli import run; sys.exit(run())"
    )
    args = ["worker", "--app", APP, "-p", processes, "--metrics-port", str(free_port())]
    r = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True, text=True, env=cli_env(url), cwd=tmp_path, timeout=30,
    )  # fmt: skip
    assert r.returncode == 1, r.stderr
    assert "--metrics-port needs prometheus-client: pip install 'taskmill[metrics]'" in r.stderr
