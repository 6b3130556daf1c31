"""What the examples share (``examples/_support``): the throwaway servers start, answer and
leave nothing behind; the serving thread serves and stops; a stop that is not obeyed ends in
SIGKILL; scripted faults and settings refuse bad input precisely."""

from __future__ import annotations

import doctest
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import httpx
import pytest
from examples._support import env, faults, processes, servers
from examples._support.serving import serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "kind", [servers.ThrowawayRedis, servers.ThrowawayNats, servers.ThrowawayPostgres]
)
def test_a_throwaway_server_answers_then_leaves_nothing(kind: type[servers.Throwaway]) -> None:
    with kind() as server:
        assert server.ready(), f"{server.url} does not answer"
        assert str(server.port) in server.url
        directory, proc = server.directory, server.proc
        assert proc is not None and directory.is_dir()
    assert proc.returncode is not None and _gone(proc.pid)
    assert not directory.exists()


@pytest.mark.timeout(30)
def test_a_server_that_exits_at_start_is_reported_with_its_log(tmp_path: Path) -> None:
    class Broken(servers.ThrowawayRedis):
        def argv(self) -> list[str]:
            return [*super().argv(), "--no-such-option", "yes"]

    with pytest.raises(RuntimeError, match=r"(?s)redis-server exited at start .*no-such-option"):
        Broken(tmp_path / "redis").start()


@pytest.mark.timeout(30)
def test_serve_answers_on_its_port_and_stops() -> None:
    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse("hello")

    served = serve(Starlette(routes=[Route("/", hello)]))
    try:
        assert httpx.get(served.url + "/", timeout=5).text == "hello"
    finally:
        served.stop()
    assert not served.thread.is_alive()
    with pytest.raises(httpx.TransportError):
        httpx.get(served.url + "/", timeout=2)


@pytest.mark.timeout(30)
def test_a_process_that_ignores_sigterm_is_killed_after_the_deadline() -> None:
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " + (
        "print('ready', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", stubborn], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        assert processes.stop(proc, timeout_s=0.5) is None
        assert proc.returncode == -signal.SIGKILL
    finally:
        processes.kill(proc)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.timeout(10)
def test_child_env_puts_the_root_on_the_path_and_drops_the_parents_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TASKMILL_URL", "redis://parent/0")
    env_ = processes.child_env({"PERSONA_LEASE_S": "3"})
    assert "TASKMILL_URL" not in env_ and env_["PERSONA_LEASE_S"] == "3"
    assert env_["PYTHONPATH"].split(os.pathsep)[0] == str(processes.ROOT)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("soon", "LEASE_S must be a number of seconds, not 'soon'"),
        ("0", "LEASE_S must be more than 0 seconds, not '0'"),
        ("nan", "LEASE_S must be more than 0 seconds, not 'nan'"),
    ],
)
def test_a_bad_number_of_seconds_is_refused_by_name(raw: str, message: str) -> None:
    with pytest.raises(LookupError, match=f"^{message}$"):
        env.env_seconds({"LEASE_S": raw}, "LEASE_S", 30.0, error=LookupError)


@pytest.mark.timeout(10)
def test_a_script_with_an_unknown_fault_is_refused_whole() -> None:
    script = faults.FaultScript[str](faults.http_status_or_timeout, "a status or 'timeout'")
    with pytest.raises(ValueError, match="not '200'"):
        script.add("/sms", ["500", "200"])
    assert script.pending("/sms") == 0  # nothing of it was kept
    script.add("/sms", ["500"])
    script.add("/events", ["timeout"])
    assert script.next("/sms", "/events") == "500"  # the narrow key first
    assert script.next("/sms", "/events") == "timeout"
    assert script.total() == 0


@pytest.mark.timeout(10)
@pytest.mark.parametrize("module", [env, faults, processes], ids=lambda m: m.__name__)
def test_the_docstring_examples_hold(module: ModuleType) -> None:
    failures, tried = doctest.testmod(module)
    assert (failures, tried > 0) == (0, True)
