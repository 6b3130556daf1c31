"""T9 (docs/reliability.md): malformed and poison records among good jobs, on each broker.

A clean run first: good jobs only, one ``taskmill worker -p 2 -c 4`` supervisor, its good-job
throughput and its children's peak RSS. Then the same number of good jobs interleaved with bad
records written straight into the broker's storage (SQL rows, Redis hashes and ready sets,
NATS KV records with their dispatch pointers), 8 classes, and a second supervisor. Every bad
record must end ``failed`` with an error naming its class, within 10 s of its claim; every good
job must succeed; no worker process may die; the good jobs' throughput and the workers' peak
RSS are compared with the clean run's. The pickle class would create a canary file if anything
unpickled it.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from faults import poison_app
from faults.ledger import Ledger
from faults.poison import (
    BROKERS,
    Bad,
    broker_url,
    make_app,
    run_until_finished,
    send_good,
    throughput,
    write_bad,
)
from faults.schedule import SEED_ENV, seed_from_env
from faults.sizes import sized
from taskmill.job import JobState

GOOD = sized(ci=480, full=10_000)
PER_CLASS = sized(ci=6, full=1_250)
LIMIT = poison_app.MAX_PAYLOAD_BYTES
DEPTH = 100_000
DEADLINE_S = 10.0
"""Each bad record must be failed within this many seconds of its claim."""
MIN_RATIO = sized(ci=0.5, full=0.8)
"""Good-job throughput against the clean run's: the plan's 80 % at full size; at CI size a
few hundred jobs of 10 ms beside other fault tests make the ratio noisy (NATS 0.70 and 0.74
in two runs of the faults tier), so the gate is lenient (the figure is printed either way)."""
PAUSE_MS = 10
ARGS = ("-p", "2", "-c", "4", "--lease", "5")


@dataclass(frozen=True)
class Kind:
    """A class of bad record: how to make its payload, and what its error must say."""

    name: str
    task: str
    payload: Callable[[int, Path], bytes]
    types: tuple[str, ...]
    says: str


def _pickle(i: int, canary: Path) -> bytes:
    class Canary:
        def __reduce__(self) -> tuple[object, tuple[str, str]]:
            return (open, (str(canary), "w"))

    return pickle.dumps(Canary(), protocol=pickle.HIGHEST_PROTOCOL)


SERIALIZATION = "taskmill.errors.SerializationError"
KINDS = [
    Kind("invalid JSON", "poison.good", lambda i, _: b'[[%d], {"a": ' % i, (SERIALIZATION,),
         "not valid JSON"),
    Kind("wrong envelope", "poison.good", lambda i, _: b'{"args": [%d], "kwargs": {}}' % i,
         (SERIALIZATION,), "[args, kwargs]"),
    Kind("unknown task", "poison.no_such_task", lambda i, _: b"[[%d], {}]" % i,
         ("taskmill.errors.UnknownTaskError",), "no task named"),
    Kind("wrong signature/types", "poison.good",
         lambda i, _: b'[["ten"], {}]' if i % 2 else b"[[1, 2, 3], {}]",
         (SERIALIZATION, "TypeError"), ""),
    Kind("oversize", "poison.good", lambda i, _: b"[[1], {}" + b" " * LIMIT + b"]",
         ("taskmill.errors.PayloadTooLargeError",), "limit"),
    Kind("nesting depth", "poison.good",
         lambda i, _: b"[[" + b"[" * DEPTH + b"]" * DEPTH + b"], {}]", (SERIALIZATION,),
         "more than 100 deep"),
    Kind("invalid UTF-8", "poison.echo", lambda i, _: b'[["\xff\xfe%d"], {}]' % i,
         (SERIALIZATION,), "UTF-8"),
    Kind("pickle", "poison.good", _pickle, (SERIALIZATION,), "not valid JSON"),
]  # fmt: skip


@pytest.fixture(params=BROKERS)
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    name: str = request.param
    for url in broker_url(name, request, tmp_path):
        yield name, url


def _check_pickle_recipe(tmp_path: Path) -> None:
    """The pickle class's bytes do create their canary when unpickled (in a child process,
    with a canary path of its own): so a worker that unpickled them would create the real one."""
    probe = tmp_path / "probe-canary"
    data = _pickle(0, probe)
    subprocess.run(
        [sys.executable, "-c", "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"],
        input=data,
        check=True,
        timeout=30,
    )
    assert probe.exists()


@pytest.mark.timeout(sized(ci=120, full=3_600))
def test_poison_messages(
    broker: tuple[str, str], tmp_path: Path, cleanup: list[Callable[[], None]]
) -> None:
    name, url = broker
    seed = seed_from_env()
    print(f"T9 seed {seed} (replay: {SEED_ENV}={seed})")
    _check_pickle_recipe(tmp_path)
    canary = tmp_path / "CANARY-created-by-unpickling"
    ledger = Ledger(tmp_path / "ledger.db")
    app, tasks = make_app(url)
    cleanup.append(app.close)
    wait_s = sized(ci=60.0, full=1_800.0)

    # the clean run
    clean_ids = set(send_good(tasks, GOOD, PAUSE_MS))
    clean, clean_rss, clean_restarts, _ = run_until_finished(
        tmp_path, url, ledger, app, clean_ids, *ARGS, name="clean", timeout=wait_s
    )
    assert all(j.state is JobState.SUCCEEDED for j in clean)
    clean_rate = throughput(clean)

    # good jobs interleaved with bad records, in rounds
    bad: dict[str, Kind] = {}
    good_ids: set[str] = set()
    rounds = PER_CLASS
    for r in range(rounds):
        good_ids.update(send_good(tasks, GOOD // rounds, PAUSE_MS))
        records = []
        for k, kind in enumerate(KINDS):
            job_id = f"b-{k}-{uuid.uuid4().hex[:14]}"
            records.append(Bad(job_id, kind.name, kind.task, kind.payload(r, canary)))
            bad[job_id] = kind
        write_bad(name, url, app, records)
    good_ids.update(send_good(tasks, GOOD - len(good_ids), PAUSE_MS))
    every = good_ids | set(bad)
    jobs, rss, restarts, log = run_until_finished(
        tmp_path, url, ledger, app, every, *ARGS, name="poison", timeout=wait_s
    )

    good = [j for j in jobs if j.id in good_ids]
    bad_jobs = [j for j in jobs if j.id in bad]
    rate = throughput(good)
    ratio = rate / clean_rate
    wrong: list[str] = []
    slow: list[str] = []
    took: list[float] = []
    for job in bad_jobs:
        kind = bad[job.id]
        error = job.error
        if (
            job.state is not JobState.FAILED
            or error is None
            or error.type not in kind.types
            or kind.says not in error.message
        ):
            shown = None if error is None else (error.type, error.message[:120])
            wrong.append(f"{kind.name}: {job.state} {shown}")
            continue
        if job.started_at is not None and job.finished_at is not None:
            took.append(job.finished_at - job.started_at)
            if took[-1] > DEADLINE_S:
                slow.append(f"{kind.name}: {took[-1]:.1f} s")
    print(
        f"T9 {name}: good {len(good)} (succeeded "
        f"{sum(j.state is JobState.SUCCEEDED for j in good)}), bad {len(bad_jobs)} "
        f"({len(KINDS)} classes x {PER_CLASS}), failed with their reason "
        f"{len(bad_jobs) - len(wrong)}; claim-to-failed max {max(took, default=0):.2f} s; "
        f"throughput {rate:.0f}/s vs clean {clean_rate:.0f}/s (ratio {ratio:.2f}); peak RSS "
        f"{rss / 1024:.0f} MiB vs clean {clean_rss / 1024:.0f} MiB "
        f"({rss / max(clean_rss, 1):.2f}x); restarts {restarts}, clean {clean_restarts}; "
        f"canary {'CREATED' if canary.exists() else 'absent'}"
    )
    assert not canary.exists(), "something unpickled a payload"
    assert not wrong, f"{len(wrong)} bad records without their reason: {wrong[:8]}"
    assert not slow, slow[:8]
    assert all(j.state is JobState.SUCCEEDED for j in good), [
        (j.id, j.state, j.error) for j in good if j.state is not JobState.SUCCEEDED
    ][:5]
    assert restarts == 0 and clean_restarts == 0, log
    assert rss < 2 * clean_rss
    assert ratio >= MIN_RATIO
    # every bad record took the pipeline's own paths, none the "bug of ours" one
    assert "the worker failed running it" not in log, log
