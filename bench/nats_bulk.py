"""What a bulk send costs on NATS: jobs a second and CPU a job, the producer's and the server's.

    python -m bench.nats_bulk [--jobs 20000] [--batch 1000] [--runs 3] [--nats-sync default]

For each run: a fresh ``nats-server`` (the test suite's binary), one ``send_many`` of
``--batch`` no-op jobs to open everything, then ``--jobs`` jobs in ``send_many`` calls of
``--batch`` (none run: no worker). Printed per run: jobs a second (wall clock), the producer
process's CPU microseconds a job (both its threads: building the jobs, and the broker's I/O
loop) and the server's (from ``/proc``), and the load average. On a shared machine the wall
figure follows the load; the CPU figures much less so, and they say where the time goes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from bench.compare_nats import nats_server
from taskmill import App


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, from ``/proc``."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _server_pid(port: int) -> int:
    """The nats-server listening on ``port`` (the one ``nats_server`` started)."""
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().split(b"\0")
            if not cmdline[0].endswith(b"nats-server"):
                continue
            config = cmdline[cmdline.index(b"-c") + 1].decode()
            with open(config) as f:
                if f'127.0.0.1:{port}"' in f.read():
                    return int(pid)
        except (OSError, ValueError, IndexError):
            continue
    raise RuntimeError(f"no nats-server found on port {port}")


def measure(jobs: int, batch: int, sync_always: bool) -> dict[str, float]:
    with (
        tempfile.TemporaryDirectory() as tmp,
        nats_server(tmp, sync_always=sync_always) as (port, _),
    ):
        server = _server_pid(port)
        app = App(f"nats://127.0.0.1:{port}?prefix=bulk")

        @app.task(name="noop")
        def noop() -> None:
            return None

        try:
            noop.send_many([()] * batch)  # connect, create the streams and the lane
            server_0, producer_0 = _cpu_s(server), time.process_time()
            started = time.perf_counter()
            for start in range(0, jobs, batch):
                noop.send_many([()] * min(batch, jobs - start))
            wall = time.perf_counter() - started
            server_1, producer_1 = _cpu_s(server), time.process_time()
        finally:
            app.close()
    return {
        "jobs_per_s": jobs / wall,
        "producer_us": 1e6 * (producer_1 - producer_0) / jobs,
        "server_us": 1e6 * (server_1 - server_0) / jobs,
        "load": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=1_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--nats-sync", choices=["always", "default"], default="default")
    args = parser.parse_args()
    rates = []
    for run in range(1, args.runs + 1):
        got = measure(args.jobs, args.batch, args.nats_sync == "always")
        rates.append(got["jobs_per_s"])
        print(
            f"run {run}: {got['jobs_per_s']:,.0f} jobs/s; CPU a job: producer "
            f"{got['producer_us']:.0f} µs, nats-server {got['server_us']:.0f} µs; "
            f"load average {got['load']:.1f}",
            flush=True,
        )
    print(f"median {statistics.median(rates):,.0f} jobs/s")


if __name__ == "__main__":
    main()
