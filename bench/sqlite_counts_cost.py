"""What the SQLite schema's count triggers (version 6) cost each write of a job's life.

    python -m bench.sqlite_counts_cost [--jobs 20000] [--rounds 5]

The same statements as the broker's (the named queries of ``sql/sqlite.sql``), on a file made
with the schema of version 5 (no counts) and one of version 6, in turns: a batch insert of due
jobs (a ``send_many``), one ``UPDATE`` claiming them all, a finish per job (``finish_succeeded``,
in one transaction), and the delete of them all (a prune). Times are this process's CPU time per
job (``time.process_time``), the median of the rounds: on a shared machine, wall-clock time
measures the neighbours as much as the code.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import tempfile
import time

from taskmill.brokers.sqlite.schema import Q, _statements

STEPS = ("insert", "claim", "finish", "delete")


def make(path: str, version: int) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("BEGIN")
    for name in ("schema_v1", "schema_v5", "schema_v6")[: version - 3]:
        for statement in _statements(Q[name]):
            conn.execute(statement)
    conn.execute("COMMIT")
    return conn


def one_round(conn: sqlite3.Connection, jobs: int) -> dict[str, float]:
    rows = [
        (f"id{i}", "t", "q", "queued", b"[]", 0, 1, 1.0, 1.0, None, None, None) for i in range(jobs)
    ]

    def claim() -> None:
        conn.execute("UPDATE taskmill_jobs SET state = 'running', lease_token = 'x'")

    def finish() -> None:
        for i in range(jobs):
            conn.execute(Q["finish_succeeded"], (b"1", 2.0, f"id{i}", "x"))

    steps = {
        "insert": lambda: conn.executemany(Q["insert"], rows),
        "claim": claim,
        "finish": finish,
        "delete": lambda: conn.execute("DELETE FROM taskmill_jobs"),
    }
    spent = {}
    for name in STEPS:
        start = time.process_time()
        conn.execute("BEGIN IMMEDIATE")
        steps[name]()
        conn.execute("COMMIT")
        spent[name] = (time.process_time() - start) / jobs * 1e6
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    results: dict[int, list[dict[str, float]]] = {5: [], 6: []}
    for _ in range(args.rounds):
        for version in (5, 6):
            with tempfile.TemporaryDirectory() as tmp:
                conn = make(os.path.join(tmp, "jobs.db"), version)
                results[version].append(one_round(conn, args.jobs))
                conn.close()
    print(f"CPU µs per job, median of {args.rounds} rounds of {args.jobs:,} jobs")
    print("schema   " + "  ".join(f"{s:>7}" for s in STEPS))
    for version, rounds in results.items():
        medians = [statistics.median(r[s] for r in rounds) for s in STEPS]
        print(f"v{version}       " + "  ".join(f"{m:7.2f}" for m in medians))


if __name__ == "__main__":
    main()
