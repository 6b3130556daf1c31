"""``taskmill dashboard`` in a subprocess: refused beyond loopback without auth, served with
the auth its options and environment give, stopped by SIGTERM."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from servers import free_port
from taskmill.testing import wait_until

TESTS = Path(__file__).resolve().parents[1]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKMILL_")}
    env["TASKMILL_URL"] = f"sqlite:///{tmp_path / 'jobs.db'}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def _dashboard(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "taskmill", "dashboard", "web.dashboard_app:app", *args],
        env=_env(tmp_path, **env),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1"])
def test_a_public_host_without_auth_is_refused(tmp_path: Path, host: str) -> None:
    done = _dashboard(tmp_path, "--host", host, "--port", str(free_port()))
    assert done.returncode == 1
    assert done.stderr.startswith(f"error: refusing to serve the dashboard on {host} without auth")
    assert "TASKMILL_DASHBOARD_USERS" in done.stderr


def test_a_malformed_user_setting_is_refused_without_echoing_it(tmp_path: Path) -> None:
    done = _dashboard(tmp_path, TASKMILL_DASHBOARD_USERS="ops:pw1,only-a-secret")
    assert done.returncode == 1
    assert "TASKMILL_DASHBOARD_USERS: item 2 is not 'name:password'" in done.stderr
    assert "only-a-secret" not in done.stderr + done.stdout
    bad_option = _dashboard(tmp_path, "--user", "no-colon-secret")
    assert bad_option.returncode == 2 and "NAME:PASSWORD" in bad_option.stderr
    assert "no-colon-secret" not in bad_option.stderr


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "taskmill", "dashboard", "web.dashboard_app:app",
         "--port", str(port), "--read-only-user", "viewer:view-pw-2"],
        env=_env(tmp_path, TASKMILL_DASHBOARD_USERS="ops:ops-pw-1"),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()


def _auth(name: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{name}:{password}".encode()).decode()}


def test_the_dashboard_serves_with_auth_and_stops_on_sigterm(
    running: tuple[subprocess.Popen[str], str],
) -> None:
    proc, url = running

    def ready() -> bool:
        assert proc.poll() is None, "the dashboard exited early"
        try:
            return httpx.get(f"{url}/ready", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(ready, timeout=30, what="the dashboard to answer /ready")
    assert httpx.get(f"{url}/api/v1/queues").status_code == 401
    assert httpx.get(f"{url}/api/v1/queues", headers=_auth("ops", "ops-pw-1")).status_code == 200
    viewer = _auth("viewer", "view-pw-2")
    assert httpx.get(f"{url}/api/v1/queues", headers=viewer).status_code == 200
    assert httpx.post(f"{url}/api/v1/queues/default/pause", headers=viewer).status_code == 403
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    assert proc.stdout is not None
    output = proc.stdout.read()
    assert "taskmill dashboard on http://127.0.0.1:" in output
    assert "ops-pw-1" not in output and "view-pw-2" not in output
