"""Jobs with large payloads on NATS: what a send, a drain and a listing cost.

    python -m bench.nats_payloads [--jobs 2000] [--kib 200] [--runs 2]

For each run: a fresh ``nats-server`` (the test suite's binary, its default fsync), ``--jobs``
jobs of a ``--kib`` KiB string each sent with ``send`` one by one, then drained by an in-process
worker (``run_until_idle``; the task returns the string's length), then one
listing page of 100 jobs read. Printed per run: send and drain jobs a second, the server's CPU
microseconds a job during the drain (from ``/proc``), the listing's milliseconds, and the bytes
the ``jobs`` bucket stores at the end. Payloads over 16 KiB are stored apart from their records
(docs/brokers.md): the drain's claims, heartbeats and finishes rewrite records of a few hundred
bytes instead of the payload each time.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time

from bench.compare_nats import nats_server
from bench.nats_bulk import _cpu_s, _server_pid
from taskmill import App
from taskmill.brokers.base import JobQuery


def _bucket_bytes(app: App, what: str) -> int:
    broker = app.broker

    async def size() -> int:
        session = await broker._session()  # type: ignore[attr-defined]
        stream = f"KV_{broker.config.bucket(what)}"  # type: ignore[attr-defined]
        try:
            info = await session.nc.jetstream().stream_info(stream)
        except Exception:  # an older taskmill has no such bucket
            return 0
        return int(info.state.bytes)

    loop = broker._io_loop()  # type: ignore[attr-defined]
    return asyncio.run_coroutine_threadsafe(size(), loop).result(timeout=30)


def measure(jobs: int, kib: int) -> dict[str, float]:
    text = "x" * (kib * 1024)
    with tempfile.TemporaryDirectory() as tmp, nats_server(tmp, sync_always=False) as (port, _):
        server = _server_pid(port)
        app = App(f"nats://127.0.0.1:{port}?prefix=big", max_payload_bytes=(kib + 1) * 1024)

        @app.task(name="size")
        def size(value: str) -> int:
            return len(value)

        try:
            size.send("warm-up")
            app.run_until_idle()
            started = time.perf_counter()
            for _ in range(jobs):
                size.send(text)
            sent = time.perf_counter() - started
            server_0 = _cpu_s(server)
            started = time.perf_counter()
            ran = app.run_until_idle()
            drained = time.perf_counter() - started
            server_1 = _cpu_s(server)
            assert ran == jobs, f"{ran} of {jobs} jobs ran"
            started = time.perf_counter()
            page = app.run_sync(app.broker.find_jobs(JobQuery(), limit=100))
            listed = time.perf_counter() - started
            assert len(page.jobs) == 100
            return {
                "send_per_s": jobs / sent,
                "drain_per_s": jobs / drained,
                "server_us": 1e6 * (server_1 - server_0) / jobs,
                "list_ms": listed * 1000,
                "jobs_mb": _bucket_bytes(app, "jobs") / 1e6,
                "payloads_mb": _bucket_bytes(app, "payloads") / 1e6,
            }
        finally:
            app.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--jobs", type=int, default=2_000)
    parser.add_argument("--kib", type=int, default=200)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    results = []
    for run in range(1, args.runs + 1):
        r = measure(args.jobs, args.kib)
        results.append(r)
        print(
            f"run {run}: send {r['send_per_s']:,.0f} jobs/s, drain {r['drain_per_s']:,.0f} "
            f"jobs/s, server {r['server_us']:,.0f} µs CPU a job drained, a listing page of "
            f"100 {r['list_ms']:.0f} ms; stored: jobs bucket {r['jobs_mb']:.1f} MB, payloads "
            f"bucket {r['payloads_mb']:.1f} MB",
            flush=True,
        )
    print(
        f"median of {args.runs}: drain "
        f"{statistics.median(r['drain_per_s'] for r in results):,.0f} jobs/s, send "
        f"{statistics.median(r['send_per_s'] for r in results):,.0f} jobs/s "
        f"({args.jobs:,} jobs of {args.kib} KiB)"
    )


if __name__ == "__main__":
    main()
