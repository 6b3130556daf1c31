"""Jobs per second sent through ``POST /api/v1/jobs`` from one keep-alive HTTP client.

    python -m bench.api_enqueue                          # SQLite, 10,000 jobs
    python -m bench.api_enqueue --broker redis --jobs 20000
    python -m bench.api_enqueue --broker postgres --connections 4
    python -m bench.api_enqueue --url redis://127.0.0.1:6379/0   # a server of your own

``taskmill dashboard bench.noop_app:app`` runs in a subprocess (one uvicorn process, the
default), on a fresh broker: a SQLite file in a temp dir, or a Redis or PostgreSQL server that
this script starts on a free port (``tests/servers.py``). The client, this process, sends
``{"task": "add", "args": [1, 2]}`` (an annotated task: the arguments are checked against its
signature and types) over ``--connections`` persistent connections (default 1: one client,
one request at a time; with more, one asyncio client keeps that many requests in flight),
after a warm-up, then checks that every job was stored. Prints the
jobs per second, the latency percentiles, and the CPU time the server process (every thread:
HTTP, the app, the broker's client) spent per job, from /proc: on a shared machine the rate
moves with the load, the CPU per job much less. The figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from taskmill.testing import wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BODY = json.dumps({"task": "add", "args": [1, 2]}).encode()
WARMUP = 500


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


@contextmanager
def broker_url(kind: str, stack: ExitStack) -> Iterator[str]:
    """A fresh broker of ``kind``; its server (if any) stops at the end."""
    directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="taskmill-api-bench-"))
    if kind == "sqlite":
        yield f"sqlite:///{directory}/bench.db"
        return
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from pathlib import Path

    from servers import PostgresServer, RedisServer

    if kind == "redis":
        redis_server = RedisServer(Path(directory))
        redis_server.start()
        try:
            yield redis_server.url
        finally:
            redis_server.kill()
        return
    pg_server = PostgresServer()
    pg_server.start()
    try:
        yield pg_server.url
    finally:
        pg_server.cleanup()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def dashboard(url: str, port: int, log_level: str) -> Iterator[tuple[str, int]]:
    env = {**os.environ, "TASKMILL_URL": url, "PYTHONPATH": ROOT}
    env = {k: v for k, v in env.items() if not k.startswith("TASKMILL_DASHBOARD_")}
    cmd = [
        sys.executable, "-m", "taskmill", "dashboard", "bench.noop_app:app",
        "--port", str(port), "--log-level", log_level,
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"127.0.0.1:{port}"

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"the dashboard exited with {proc.returncode}")
        conn = http.client.HTTPConnection(base, timeout=2)
        try:
            conn.request("GET", "/ready")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    try:
        wait_until(ready, timeout=60, what="the dashboard to answer /ready")
        yield base, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _request_bytes(base: str) -> bytes:
    head = (
        f"POST /api/v1/jobs HTTP/1.1\r\nHost: {base}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(BODY)}\r\n\r\n"
    )
    return head.encode() + BODY


async def _send_jobs(base: str, n: int, latencies: list[float]) -> None:
    """``n`` sends over one keep-alive connection, each answered before the next is sent.
    A minimal HTTP/1.1 client on asyncio streams: the client's own cost stays small beside
    the server's on a machine of two cores (http.client in threads cost the server a core)."""
    host, port = base.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    request = _request_bytes(base)
    try:
        for _ in range(n):
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
            await reader.readexactly(length)
            if status != 201:
                raise RuntimeError(f"POST /api/v1/jobs answered {status}")
            latencies.append(time.perf_counter() - started)
    finally:
        writer.close()


def send_jobs(base: str, n: int, latencies: list[float]) -> None:
    asyncio.run(_send_jobs(base, n, latencies))


async def _send_concurrently(base: str, per_connection: int, latencies: list[list[float]]) -> None:
    await asyncio.gather(*(_send_jobs(base, per_connection, part) for part in latencies))


def stored(base: str) -> int:
    conn = http.client.HTTPConnection(base, timeout=30)
    try:
        conn.request("GET", "/api/v1/queues")
        queues = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    return sum(q["counts"]["queued"] for q in queues)


def run(base: str, pid: int, jobs: int, connections: int) -> dict[str, float]:
    before = stored(base)
    send_jobs(base, WARMUP, [])
    cpu_before = cpu_seconds(pid)
    per_connection = jobs // connections
    latencies: list[list[float]] = [[] for _ in range(connections)]
    started = time.perf_counter()
    asyncio.run(_send_concurrently(base, per_connection, latencies))
    elapsed = time.perf_counter() - started
    server_cpu = cpu_seconds(pid) - cpu_before
    flat = [x for part in latencies for x in part]
    if len(flat) != per_connection * connections:
        raise RuntimeError("a client thread failed: see its traceback above")
    sent = WARMUP + per_connection * connections
    if stored(base) - before != sent:
        raise RuntimeError(f"{stored(base) - before} jobs stored, {sent} sent")
    return {
        "jobs_per_s": len(flat) / elapsed,
        "p50_ms": percentile(flat, 50) * 1000,
        "p99_ms": percentile(flat, 99) * 1000,
        "server_cpu_us": server_cpu / len(flat) * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--broker", choices=["sqlite", "redis", "postgres"], default="sqlite")
    parser.add_argument("--url", help="a broker of your own instead (its data is added to)")
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--log-level", default="warning", help="the dashboard's (info: log "
                        "every send)")  # fmt: skip
    args = parser.parse_args()
    with ExitStack() as stack:
        url = args.url or stack.enter_context(broker_url(args.broker, stack))
        base, pid = stack.enter_context(dashboard(url, free_port(), args.log_level))
        result = run(base, pid, args.jobs, args.connections)
    print(
        f"{'own broker' if args.url else args.broker}: {args.jobs} jobs over "
        f"{args.connections} connection(s), dashboard log level {args.log_level}: "
        f"{result['jobs_per_s']:,.0f} jobs/s, latency p50 {result['p50_ms']:.2f} ms, "
        f"p99 {result['p99_ms']:.2f} ms; the server's CPU per job {result['server_cpu_us']:.0f} µs"
        f" (load average {os.getloadavg()[0]:.1f})"
    )


if __name__ == "__main__":
    main()
