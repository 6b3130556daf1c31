"""What a listing costs on NATS, where no index stands beside the jobs bucket.

    python -m bench.nats_listing [--jobs 10000,50000] [--rounds 3]

For each size: a fresh ``nats-server`` (the test suite's binary, default fsync), that many
jobs sent with ``send_many`` (none run), then the median of ``--rounds`` wall-clock timings of
``stats()`` (the dashboard's queue table), ``list_jobs(state="queued", limit=50)`` (a page),
``get_job`` (one record, for scale) and a worker's ``prune`` with results kept 7 days (the
default: nothing to prune). Each of the first two reads the whole bucket; the prune reads up
to the first record stored after its cutoff.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from bench.compare_nats import nats_server
from taskmill import App


def measure(jobs: int, rounds: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp, nats_server(tmp, sync_always=False) as (port, _):
        app = App(f"nats://127.0.0.1:{port}?prefix=listing")

        @app.task(name="noop")
        def noop(n: int) -> None:
            return None

        handles = []
        for start in range(0, jobs, 1000):
            handles += noop.send_many([(i,) for i in range(start, min(jobs, start + 1000))])
        one = handles[len(handles) // 2].id
        timings: dict[str, list[float]] = {
            "stats": [],
            "list page": [],
            "get_job": [],
            "prune": [],
        }
        week = 7 * 24 * 3600.0
        for _ in range(rounds):
            for name, call in (
                ("stats", app.stats),
                ("list page", lambda: app.list_jobs(state="queued", limit=50)),
                ("get_job", lambda: app.get_job(one)),
                ("prune", lambda: app.run_sync(app.broker.prune(time.time() - week))),
            ):
                started = time.perf_counter()
                call()
                timings[name].append(time.perf_counter() - started)
        app.close()
    return {name: statistics.median(values) for name, values in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", default="10000,50000")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(
        f"{'jobs':>8}  {'stats ms':>9}  {'list page ms':>12}  {'get_job ms':>10}  {'prune ms':>9}"
    )
    for jobs in (int(n) for n in args.jobs.split(",")):
        t = measure(jobs, args.rounds)
        print(
            f"{jobs:>8}  {t['stats'] * 1e3:>9.0f}  {t['list page'] * 1e3:>12.0f}  "
            f"{t['get_job'] * 1e3:>10.2f}  {t['prune'] * 1e3:>9.1f}"
        )


if __name__ == "__main__":
    main()
