"""The supervisor's restarts: a child that cannot start is restarted after a growing back-off,
one that started (took a heartbeat) and was then killed by its work at once."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import textwrap
import threading

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
