"""The supervisor's restarts: a child that cannot start is restarted after a growing back-off,
one that started (took a heartbeat) and was then killed by its work at once."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from taskmill.testing import wait_until

pytestmark = pytest.mark.timeout(60)

RESTART = re.compile(r"process \d+ \((\w+)\) .* restarting in ([\d.]+) s")

SCRIPT = textwrap.dedent(
    """
    import logging, sys
    from taskmill.worker.supervisor import Pool, Supervisor

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    beat_then_die = "import os, sys; os.write(int(sys.argv[-1]), b'.'); os._exit(1)"
    die = "import os; os._exit(1)"
    pools = [
        Pool([sys.executable, "-c", beat_then_die], 1, "started"),
        Pool([sys.executable, "-c", die], 1, "broken"),
    ]
    sys.exit(Supervisor(pools, restart_base_s=0.1, restart_cap_s=0.8).run())
    """
)


def test_a_child_that_heartbeated_restarts_at_once_one_that_cannot_start_backs_off() -> None:
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr or []), daemon=True)
    reader.start()

    def delays() -> dict[str, list[float]]:
        found: dict[str, list[float]] = {"started": [], "broken": []}
        for line in list(lines):
            m = RESTART.search(line)
            if m:
                found[m[1]].append(float(m[2]))
        return found

    try:
        wait_until(
            lambda: len(delays()["broken"]) >= 5 and len(delays()["started"]) >= 8,
            what=lambda: f"restarts of both pools; log:\n{''.join(lines)}",
            timeout=40,
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        reader.join(timeout=10)
        proc.stderr.close()
    got = delays()
    assert got["broken"][:5] == [0.1, 0.2, 0.4, 0.8, 0.8], got
    assert set(got["started"]) == {0.0}, got


FORK_SCRIPT = textwrap.dedent(
    """
    import logging, os, sys
    from taskmill.worker.supervisor import Pool, Supervisor

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = [
        sys.executable, "-m", "taskmill", "worker", "cliapp:app", "-c", "1", "-p", "1",
        "--parent-pid", str(os.getpid()),
    ]
    sys.exit(Supervisor([Pool(argv, 1)], fork_keep_s=float(sys.argv[1])).run())
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="restarts by fork: Linux only")
def test_the_fork_server_stops_once_the_pool_went_a_while_without_a_death(
    tmp_path: Path,
) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TASKMILL_")},
        "TASKMILL_URL": f"sqlite:///{tmp_path}/jobs.db",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path]),
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", FORK_SCRIPT, "1.0"], stderr=subprocess.PIPE, text=True, env=env
    )
    assert proc.stderr is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr or []), daemon=True)
    reader.start()

    def seen(text: str, count: int = 1) -> bool:
        return sum(text in line for line in list(lines)) >= count

    def child() -> int:
        found = re.findall(r"worker process 0 started \(pid (\d+)", "".join(lines))
        return int(found[-1])

    try:
        wait_until(lambda: seen("started: queues"), what=lambda: "".join(lines), timeout=20)
        os.kill(child(), signal.SIGKILL)
        wait_until(lambda: seen("fork server started"), what=lambda: "".join(lines), timeout=20)
        wait_until(lambda: seen("started: queues", 2), what=lambda: "".join(lines), timeout=20)
        # a second of no death: the server is stopped, and exits
        wait_until(
            lambda: seen("stopping the fork server"), what=lambda: "".join(lines), timeout=20
        )
        server = int(re.findall(r"fork server started \(pid (\d+)", "".join(lines))[-1])
        wait_until(lambda: not Path(f"/proc/{server}").exists(), timeout=20)
        # the next death is replaced by a fresh process (and a new server starts)
        os.kill(child(), signal.SIGKILL)
        wait_until(lambda: seen("fork server started", 2), what=lambda: "".join(lines), timeout=20)
        wait_until(lambda: seen("started: queues", 3), what=lambda: "".join(lines), timeout=20)
        assert not seen(", forked)"), "".join(lines)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        reader.join(timeout=10)
        proc.stderr.close()
    assert code == 0, "".join(lines)
