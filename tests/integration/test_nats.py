"""What only the NATS broker has to show (issue 13): ack waits, fencing across a paused worker,
prefixes, an unreachable server, a producer killed between its two writes, and a 3-node
cluster losing a node mid-run. Every case runs against real ``nats-server`` processes.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from taskmill import App, BrokerUnavailableError, JobNotFoundError, JobState, current_job
from taskmill.brokers.base import JobQuery
from taskmill.job import Job
from taskmill.testing import await_until, running_worker, wait_until

from . import nats_runs_app
from .support import HERE, Workers, all_jobs, wait_registered

pytestmark = pytest.mark.timeout(120)
T = TypeVar("T")


def _url(server_url: str, **options: str) -> str:
    query = "&".join(
        [f"prefix=n{uuid.uuid4().hex[:10]}", *(f"{k}={v}" for k, v in options.items())]
    )
    return f"{server_url}?{query}"


def _runs(path: Path) -> collections.Counter[str]:
    if not path.exists():
        return collections.Counter()
    return collections.Counter(line.split()[0] for line in path.read_text().splitlines())


def test_a_job_longer_than_the_ack_wait_runs_once(nats_server, tmp_path: Path) -> None:
    """taskiq-nats re-ran every job longer than its consumer's 30 s ack wait; here a claim
    acknowledges its pointer at once and the record's lease (renewed by heartbeats) is what
    keeps the job, so a job four times the ack wait runs once."""
    app = App(_url(nats_server.url, ack_wait="1"), lease_s=2.0, heartbeat_s=0.2)
    runs: list[str] = []

    @app.task()
    def slow() -> str:
        runs.append("ran")
        time.sleep(4.0)  # the job's own work: four ack waits long
        return "done"

    try:
        with running_worker(app, concurrency=2):
            handle = slow.send()
            assert handle.result(timeout=30) == "done"
        assert runs == ["ran"]
        job = app.get_job(handle.id)
        assert job.attempt == 1 and job.lost_leases == 0
    finally:
        app.close()


def test_two_prefixes_on_one_server_stay_apart(nats_server) -> None:
    left = App(_url(nats_server.url))
    right = App(_url(nats_server.url))
    ran: dict[str, list[str]] = {"left": [], "right": []}

    for name, app in (("left", left), ("right", right)):

        @app.task(name="mark")
        def mark(side: str, _name: str = name) -> str:
            ran[_name].append(side)
            return side

    try:
        lefts = [left.get_task("mark").send("L") for _ in range(5)]
        rights = [right.get_task("mark").send("R") for _ in range(3)]
        assert {j.id for j in left.list_jobs().jobs} == {h.id for h in lefts}
        assert {j.id for j in right.list_jobs().jobs} == {h.id for h in rights}
        with pytest.raises(JobNotFoundError):
            left.get_job(rights[0].id)
        with running_worker(left):
            assert [h.result(timeout=10) for h in lefts] == ["L"] * 5
        assert ran == {"left": ["L"] * 5, "right": []}, "a worker ran another prefix's job"
        assert all(right.get_job(h.id).state is JobState.QUEUED for h in rights)
    finally:
        left.close()
        right.close()


def test_an_unreachable_server_fails_within_the_bound(tmp_path: Path) -> None:
    from servers import free_port

    app = App(f"nats://127.0.0.1:{free_port()}?unavailable_after=1")

    @app.task()
    def noop() -> None:
        return None

    try:
        started = time.monotonic()
        with pytest.raises(BrokerUnavailableError, match=r"NATS at 127\.0\.0\.1:\d+"):
            noop.send()
        assert time.monotonic() - started < 5.0
    finally:
        app.close()


def test_a_paused_workers_late_finish_is_refused(nats_server, tmp_path: Path) -> None:
    """Worker A takes a job and is frozen (SIGSTOP) past its lease; worker B recovers and runs
    the job; A is thawed and finishes: its write is refused (the record's lease token is B's),
    and B's own run ends the job. Each claim acknowledged its own pointer, so A's late
    acknowledgements cannot reach B's delivery: nothing is left pending on the stream."""
    url = _url(nats_server.url)
    runs, release = tmp_path / "runs.txt", tmp_path / "release"
    env = {"RUNS_FILE": str(runs), "RELEASE_FILE": str(release)}
    app = App(url, **nats_runs_app.SETTINGS)
    hold = app.task(name="hold", retries=3, backoff=0.05)(nats_runs_app.hold)
    workers = Workers(tmp_path, "nats_runs_app:app")
    try:
        first = workers.start(url, "--concurrency", "1", **env)
        wait_registered(app, first, workers)
        handle = hold.send()
        wait_until(lambda: _runs(runs)[handle.id] == 1, what="worker A to start the job")
        os.kill(first.pid, signal.SIGSTOP)
        second = workers.start(url, "--concurrency", "1", **env)
        wait_until(
            lambda: _runs(runs)[handle.id] == 2,
            what=lambda: f"worker B to run the job again:\n{workers.output()[-3000:]}",
            timeout=30,
        )
        job = app.get_job(handle.id)
        assert job.attempt == 2 and job.lost_leases == 1
        os.kill(first.pid, signal.SIGCONT)
        release.touch()  # both runs may end now: A's first (it was running), then B's
        assert handle.result(timeout=20) == second.pid, "the job's result is B's, not A's"
        done = app.get_job(handle.id)
        assert done.state is JobState.SUCCEEDED and done.attempt == 2
        assert _pending_on_stream(app) == 0
    finally:
        app.close()
        workers.close()


def _stored(app: App, job_id: str, *, leader: bool = False) -> Job | None:
    app.open()
    if not leader:
        return app.run_sync(app.broker.get(job_id))
    from taskmill.brokers.nats import NatsBroker
    from taskmill.brokers.nats.config import token
    from taskmill.brokers.nats.records import record_decoder

    broker = app.broker
    assert isinstance(broker, NatsBroker)

    async def read() -> Job | None:
        (entry,) = await broker._get_many("jobs", [token(job_id)], leader=True)
        return None if entry is None else record_decoder.decode(entry.value).job()

    return _on_io_loop(broker, read())


def _on_io_loop(broker: Any, coro: Coroutine[Any, Any, T]) -> T:
    """Run a look at the broker's internals where its connections live."""
    return asyncio.run_coroutine_threadsafe(coro, broker._io_loop()).result(timeout=30)


def _brief(job: Job | None) -> str:
    if job is None:
        return "missing"
    lease = None if job.lease_expires_at is None else round(job.lease_expires_at - time.time(), 1)
    return (
        f"{job.id} {job.state.value} attempt {job.attempt} {job.worker_id} lease {lease} "
        f"token {job.lease_token} started {job.started_at}"
    )


def _pending_on_stream(app: App) -> int:
    """Dispatch messages still stored (a work-queue stream keeps only unacknowledged ones)."""
    from taskmill.brokers.nats import NatsBroker

    broker = app.broker
    assert isinstance(broker, NatsBroker)

    async def count() -> int:
        session = await broker._session()
        info = await session.nc.jetstream().stream_info(broker.config.dispatch_stream)
        return int(info.state.messages)

    return _on_io_loop(broker, count())


_KILLED_PRODUCER = textwrap.dedent(
    """
    import os, signal, sys
    from taskmill import App
    from taskmill.brokers.nats.broker import NatsBroker

    async def pointers_then_die(self, records, encoded, payloads=None):
        await self._dispatch(records, first=True)  # the pointers are stored, the records not
        os.kill(os.getpid(), signal.SIGKILL)

    NatsBroker._store_new = pointers_then_die
    app = App(sys.argv[1])
    app.task(name="note")(lambda n, pause_s=0.0: n)
    app.get_task("note").options(job_id=sys.argv[2]).send(7)
    """
)


def test_a_producer_killed_between_its_two_writes_loses_nothing(
    nats_server, tmp_path: Path
) -> None:
    """A send killed with its pointer stored and its record not leaves a pointer that carries
    the job, and the worker that takes it writes the record itself: the job runs once, and a
    send of the same id afterwards finds it. (The other half, a record whose pointer was
    lost, is the sweep's: the next test.)"""
    url = _url(nats_server.url)
    job_id = f"killed-{uuid.uuid4().hex[:8]}"
    done = subprocess.run(
        [sys.executable, "-c", _KILLED_PRODUCER, url, job_id],
        env={**os.environ, "PYTHONPATH": str(HERE)},
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()
    runs = tmp_path / "runs.txt"
    os.environ["RUNS_FILE"] = str(runs)
    app = App(url, **nats_runs_app.SETTINGS)
    note = app.task(name="note", retries=5, backoff=0.05)(nats_runs_app.note)
    try:
        assert _stored(app, job_id) is None, "the record was written before the kill"
        with running_worker(app):
            wait_until(
                lambda: (job := _stored(app, job_id)) is not None and job.state.finished,
                what="the killed producer's job to run",
            )
            again = note.options(job_id=job_id).send(7)
            assert again.id == job_id
        assert app.get_job(job_id).state is JobState.SUCCEEDED
        assert _runs(runs)[job_id] == 1, "the job ran more than once"
    finally:
        os.environ.pop("RUNS_FILE", None)
        app.close()


@pytest.mark.timeout(240)
def test_a_cluster_node_killed_mid_run_loses_nothing(nats_cluster, tmp_path: Path) -> None:
    """Three nodes, replicas 3; producers and workers connected to different nodes; one node
    SIGKILLed while thousands of jobs go through: every acknowledged job succeeds, a job runs
    twice only if it was in flight, work goes on, and the node comes back and catches up."""
    nodes = nats_cluster.urls
    prefix = f"c{uuid.uuid4().hex[:10]}"
    options = f"prefix={prefix}&replicas=3&unavailable_after=20"
    worker_urls = [f"{nodes[0]}?{options}", f"{nodes[1]}?{options}"]
    producer_url = f"{nodes[2]},{nodes[1]}?{options}"
    runs = tmp_path / "runs.txt"
    env = {"RUNS_FILE": str(runs), "RELEASE_FILE": str(tmp_path / "unused")}
    app = App(producer_url, **nats_runs_app.SETTINGS)
    note = app.task(name="note", retries=5, backoff=0.05)(nats_runs_app.note)
    workers = Workers(tmp_path, "nats_runs_app:app")
    acked: list[str] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def produce() -> None:
        n = 0
        while not stop.is_set():
            try:
                acked.extend(h.id for h in note.send_many([(n + i, 0.002) for i in range(50)]))
            except BrokerUnavailableError:
                pass  # not acknowledged: allowed while the cluster elects new leaders
            except BaseException as exc:
                errors.append(exc)
                return
            n += 50

    try:
        app.open()
        procs = [workers.start(u, "--concurrency", "16", **env) for u in worker_urls]
        for proc in procs:
            wait_registered(app, proc, workers)
        producer = threading.Thread(target=produce, name="producer", daemon=True)
        producer.start()
        try:
            wait_until(lambda: len(acked) >= 1500 or errors, what="1,500 jobs sent", timeout=60)
            nats_cluster.kill(0)  # the node the first worker is connected to
            before = len(acked)
            wait_until(
                lambda: len(acked) >= before + 1500 or errors,
                what="1,500 more jobs sent with a node down",
                timeout=90,
            )
        finally:
            stop.set()
            producer.join(30)
        assert not errors, f"the producer failed with {errors[0]!r}"
        nats_cluster.start_node(0)

        def missing() -> set[str]:
            return set(acked) - set(all_jobs(app, JobState.SUCCEEDED))

        wait_until(
            lambda: not missing(),
            what=lambda: (
                f"{len(missing())} of {len(acked)} acknowledged jobs to succeed: "
                f"{[_brief(_stored(app, i)) for i in sorted(missing())[:5]]} "
                f"leader: {[_brief(_stored(app, i, leader=True)) for i in sorted(missing())[:5]]}"
            ),
            timeout=120,
        )
        # the node that came back has caught up: its copy of the jobs bucket is the others'
        stream = f"KV_{prefix}_jobs"
        wait_until(
            lambda: (
                nats_cluster.nodes[0].stream_messages(stream)
                == nats_cluster.nodes[1].stream_messages(stream)
                is not None
            ),
            what=lambda: (
                f"node 0's copy of {stream} to catch up: "
                f"{[n.stream_messages(stream) for n in nats_cluster.nodes]}"
            ),
            timeout=60,
        )
        counts = _runs(runs)
        twice = [job_id for job_id in acked if counts[job_id] > 1]
        assert len(twice) <= 16 * 2, f"{len(twice)} jobs ran twice: more than were in flight"
        assert all(p.poll() is None for p in procs), workers.output()[-3000:]
        assert len(acked) >= 3000
    finally:
        app.close()
        workers.close()


def test_delays_and_retries_without_the_servers_scheduled_messages(nats_server) -> None:
    """``schedules=workers`` (what a server before 2.12 gets): delayed jobs and retries wait
    in a subject per minute and the workers' promoter moves them when due."""
    app = App(
        _url(nats_server.url, schedules="workers"),
        lease_s=5.0,
        heartbeat_s=0.2,
        recover_interval_s=0.2,
    )
    started: list[float] = []

    @app.task(retries=2, backoff=0.3)
    def flaky(fail_first: bool) -> int:
        started.append(time.time())
        attempt = current_job().attempt
        if fail_first and attempt == 1:
            raise RuntimeError("again")
        return attempt

    try:
        app.open()
        assert not app.broker.schedules_on_server  # type: ignore[attr-defined]
        with running_worker(app):
            delayed = flaky.options(delay=1.0).send(False)
            run_at = app.get_job(delayed.id).run_at
            assert delayed.result(timeout=10) == 1
            assert run_at <= started[0] < run_at + 1.5, "promoted late or early"
            assert flaky.send(True).result(timeout=10) == 2, "the retry was never promoted"
            later = flaky.options(delay=3600).send(False)
            assert later.run_now() is JobState.SCHEDULED
            assert later.result(timeout=10) == 1
        assert _pending_on_stream(app) == 1, "only the hour-delayed pointer (now stale) is left"
    finally:
        app.close()


def test_a_record_whose_pointer_was_lost_is_sent_again_by_the_sweep(nats_server) -> None:
    """A send writes its pointer and record together; a server that crashed between storing
    the two could keep the record alone. Nothing dispatches such a job, so the workers'
    sweep sends the pointer of every waiting record last written 30 to 60 s ago (a pointer
    still stored is dropped as a duplicate). The record is written here without a pointer,
    and the sweep is run as if 45 s had passed."""
    from taskmill.brokers.nats import NatsBroker
    from taskmill.brokers.nats.config import token
    from taskmill.brokers.nats.records import new_record, record_encoder
    from taskmill.job import NewJob

    app = App(_url(nats_server.url), lease_s=5.0, heartbeat_s=0.2)

    @app.task(name="orphan")
    def orphan() -> str:
        return "ran"

    broker = app.broker
    assert isinstance(broker, NatsBroker)
    try:
        app.open()
        now = app.run_sync(broker.now())
        job = NewJob(id=f"orphan-{uuid.uuid4().hex[:8]}", task="orphan", queue="default",
                     payload=b"[[],{}]")  # fmt: skip
        record = new_record(job, now, time.time_ns())
        write = broker._put("jobs", token(job.id), record_encoder.encode(record), 0)
        _on_io_loop(broker, broker._ensure_lane("default", 0))
        _on_io_loop(broker, write)
        assert app.run_sync(broker.claim(["default"], 10, "w", 5.0)) == [], "a pointer exists"
        assert _on_io_loop(broker, broker._sweep(now + 45.0)) == []
        _on_io_loop(broker, broker._sweep(now + 45.0))  # another worker's sweep, the same
        assert _pending_on_stream(app) == 1, "a pointer sent twice was stored twice"
        with running_worker(app):
            wait_until(
                lambda: app.get_job(job.id).state is JobState.SUCCEEDED,
                what="the swept job to run",
            )
    finally:
        app.close()


_KILLED_BULK_PRODUCER = textwrap.dedent(
    """
    import os, signal, sys
    from taskmill import App
    from taskmill.brokers.nats.connection import Requests

    send_batch = Requests.send_batch

    async def records_then_die(self, messages):
        committed = await send_batch(self, messages)
        await committed  # the records' batch is stored; the pointers' is never sent
        os.kill(os.getpid(), signal.SIGKILL)

    Requests.send_batch = records_then_die
    app = App(sys.argv[1])
    app.task(name="note")(lambda n, pause_s=0.0: n)
    app.get_task("note").send_many([(n,) for n in range(int(sys.argv[2]))])
    """
)


def test_a_bulk_producer_killed_between_its_two_batches_loses_nothing(
    nats_server, tmp_path: Path
) -> None:
    """``send_many`` writes its records as one atomic batch and their pointers as another.
    A producer killed once the records' batch is stored leaves records that nothing points
    at: the workers' sweep sends their pointers (run here as if 45 s had passed), and each
    job runs once."""
    from taskmill.brokers.nats import NatsBroker

    url = _url(nats_server.url)
    done = subprocess.run(
        [sys.executable, "-c", _KILLED_BULK_PRODUCER, url, "5"],
        env={**os.environ, "PYTHONPATH": str(HERE)},
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()
    runs = tmp_path / "runs.txt"
    os.environ["RUNS_FILE"] = str(runs)
    app = App(url, **nats_runs_app.SETTINGS)
    app.task(name="note", retries=5, backoff=0.05)(nats_runs_app.note)
    broker = app.broker
    assert isinstance(broker, NatsBroker)
    try:
        stored = all_jobs(app)
        assert len(stored) == 5, "the records' batch was not stored whole"
        assert broker.atomic_batches, "the server should take atomic batches (2.12)"
        assert _pending_on_stream(app) == 0, "a pointer was stored before the kill"
        now = app.run_sync(broker.now())
        _on_io_loop(broker, broker._sweep(now + 45.0))
        assert _pending_on_stream(app) == 5
        with running_worker(app):
            wait_until(
                lambda: all(j.state is JobState.SUCCEEDED for j in all_jobs(app).values()),
                what=lambda: f"the swept jobs to run: {all_jobs(app)}",
            )
        assert _runs(runs) == dict.fromkeys(stored, 1), "a job ran more or less than once"
    finally:
        os.environ.pop("RUNS_FILE", None)
        app.close()


def test_a_bulk_send_whose_batch_is_refused_is_sent_job_by_job(nats_server) -> None:
    """One job id of a bulk send already stored: the server refuses the records' atomic
    batch whole (a create that finds its key), and the send goes again message by message,
    which stores the others and reports that one as existing."""
    from taskmill.brokers.nats import NatsBroker
    from taskmill.brokers.nats.config import token
    from taskmill.brokers.nats.records import new_record, record_encoder
    from taskmill.job import NewJob

    app = App(_url(nats_server.url))
    broker = app.broker
    assert isinstance(broker, NatsBroker)
    try:
        app.open()
        now = app.run_sync(broker.now())
        ids = [f"bulk-{n}-{uuid.uuid4().hex[:8]}" for n in range(3)]
        jobs = [NewJob(id=i, task="t", queue="default", payload=b"[[],{}]") for i in ids]
        first = record_encoder.encode(new_record(jobs[1], now, 1))
        _on_io_loop(broker, broker._put("jobs", token(jobs[1].id), first, 0))
        assert broker.atomic_batches
        result = app.run_sync(broker.enqueue(jobs))
        assert result.ids == [j.id for j in jobs]
        assert result.existing == {1}
        stored = all_jobs(app)
        assert {j.id for j in jobs} == set(stored)
        assert stored[jobs[1].id].enqueued_at == pytest.approx(now), "the stored one was replaced"
        again = app.run_sync(broker.enqueue(jobs))  # all stored: refused, then all existing
        assert again.existing == {0, 1, 2}
    finally:
        app.close()


def test_a_bulk_send_past_one_batch_stores_every_job(nats_server) -> None:
    """An atomic batch holds at most 1,000 messages: 2,500 jobs go as three slices (two
    batches each), every record and pointer stored once."""
    app = App(_url(nats_server.url))
    task = app.task(name="bulk")(lambda n: n)
    try:
        handles = task.send_many([(n,) for n in range(2_500)])
        assert len({h.id for h in handles}) == 2_500
        assert set(all_jobs(app)) == {h.id for h in handles}
        assert _pending_on_stream(app) == 2_500
    finally:
        app.close()


def test_scans_of_the_jobs_bucket_hold_a_bounded_part_of_it(nats_server) -> None:
    """Every scan of the jobs bucket (``queue_depth``, ``prune``: the workers run them; the
    listings, counts, ``retry`` of every failed job and ``purge``: the dashboard and the CLI)
    judges records as the scan brings them: with 100 records of 200 KB stored (20 MB), none
    holds more than a few MB. Before, each held the whole bucket, and T9 at full size saw a
    worker's memory at 689 MiB."""
    app = App(_url(nats_server.url))

    @app.task(name="big", retries=0)
    def big(text: str, fail: bool = False) -> int:
        if fail:
            raise ValueError("asked to")
        return len(text)

    sent = big.send_many([("x" * 200_000, n % 2 == 1) for n in range(100)])
    first = [h.id for h in sent]

    peaks: dict[str, float] = {}

    def measured(name: str, call: Coroutine[Any, Any, T]) -> T:
        tracemalloc.start()
        try:
            result = app.run_sync(call)
            peaks[name] = tracemalloc.get_traced_memory()[1] / 2**20
            return result
        finally:
            tracemalloc.stop()

    try:
        assert measured("queue_depth", app.broker.queue_depth("default")) == 100
        page = measured("find_jobs", app.broker.find_jobs(JobQuery(), limit=5, count=True))
        assert [j.id for j in page.jobs] == first[::-1][:5] and page.total == 100
        assert all(j.payload for j in page.jobs)  # the page's jobs whole
        after = app.run_sync(app.broker.find_jobs(JobQuery(), limit=5, cursor=page.next_cursor))
        assert [j.id for j in after.jobs] == first[::-1][5:10]
        (stats,) = measured("stats", app.broker.stats())
        assert stats.counts["queued"] == 100
        assert app.run_until_idle() == 100
        failed = measured("retry", app.broker.retry(None))
        assert sorted(failed) == sorted(first[1::2])
        assert measured("purge", app.broker.purge("default")) == 50
        assert app.run_sync(app.broker.queue_depth("default")) == 0
        finished = time.time() + 60
        # the 50 succeeded and the 50 purged ones' markers
        assert measured("prune", app.broker.prune(finished, limit=1_000)) == 100
        print("peak MiB: " + ", ".join(f"{name} {mib:.1f}" for name, mib in peaks.items()))
        assert max(peaks.values()) < 8, peaks
    finally:
        app.close()


def test_a_sweep_keeps_waiting_jobs_without_their_payloads(nats_server) -> None:
    """A sweep 30-60 s after a backlog was stored acts on every job of it (their pointers are
    sent again), and keeps only what a pointer needs: 100 waiting jobs of 200 KB held whole
    were 20 MB in the sweep, and 608 MiB in a worker in T9 at full size."""
    app = App(_url(nats_server.url))

    @app.task(name="big")
    def big(text: str) -> int:
        return len(text)

    from taskmill.brokers.nats import NatsBroker

    sent = {h.id for h in big.send_many([("x" * 200_000,) for _ in range(100)])}
    broker = app.broker
    assert isinstance(broker, NatsBroker)

    async def sweep_peak() -> tuple[dict[str, Any], int]:
        later = await broker._fresh_now() + 45.0  # the backlog as a sweep 45 s on sees it
        tracemalloc.start()
        try:
            found = await broker._sweep_candidates(later)
            return found, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    try:
        found, peak = asyncio.run_coroutine_threadsafe(sweep_peak(), broker._io_loop()).result(60)
        assert {record.id for _, record in found.values()} == sent
        assert all(record.payload == b"" for _, record in found.values())
        assert peak < 8 * 1024 * 1024, f"the sweep held {peak / 2**20:.1f} MiB"
    finally:
        app.close()


def _bucket_subjects(app: App, what: str) -> dict[str, int]:
    """Key -> stored size of each message in one of the broker's buckets."""
    from taskmill.brokers.nats import NatsBroker

    broker = app.broker
    assert isinstance(broker, NatsBroker)

    async def read() -> dict[str, int]:
        return {key: len(entry.value) async for key, entry in broker._scan(what)}

    return _on_io_loop(broker, read())


def test_a_large_payload_is_stored_once_apart_from_its_record(nats_server) -> None:
    """A payload over 16 KiB goes to the payloads bucket, once: the record a claim, a
    heartbeat and a finish rewrite stays small, the job runs with its arguments, reads give
    them back, and deleting or pruning the job removes the payload too."""
    app = App(_url(nats_server.url))
    seen: list[int] = []

    @app.task(name="big")
    def big(text: str) -> int:
        seen.append(len(text))
        return len(text)

    try:
        small = big.send("x" * 100)
        large = [big.send("y" * 200_000) for _ in range(2)]
        records = _bucket_subjects(app, "jobs")
        payloads = _bucket_subjects(app, "payloads")
        assert set(payloads) == {h.id for h in large}
        assert all(size > 200_000 for size in payloads.values())
        assert all(records[h.id] < 1_000 for h in large), records
        assert app.get_job(large[0].id).payload == _payload_of(app, large[0].id)
        assert app.run_until_idle() == 3
        assert sorted(seen) == [100, 200_000, 200_000]
        assert [h.result(timeout=10) for h in large] == [200_000, 200_000]
        assert small.result(timeout=10) == 100
        assert all(size < 1_000 for size in _bucket_subjects(app, "jobs").values())
        page = app.run_sync(app.broker.find_jobs(JobQuery(), limit=10))
        assert sorted(len(j.payload) for j in page.jobs)[-1] > 200_000
        assert app.run_sync(app.broker.delete([large[0].id])) == [large[0].id]
        assert set(_bucket_subjects(app, "payloads")) == {large[1].id}
        assert app.run_sync(app.broker.prune(time.time() + 60)) == 3  # 2 jobs, 1 marker
        assert _bucket_subjects(app, "payloads") == {}
    finally:
        app.close()


def _payload_of(app: App, job_id: str) -> bytes:
    from taskmill.brokers.nats import NatsBroker
    from taskmill.brokers.nats.config import token

    broker = app.broker
    assert isinstance(broker, NatsBroker)

    async def read() -> bytes:
        entry = await broker._get("payloads", token(job_id))
        assert entry is not None
        return entry.value

    return _on_io_loop(broker, read())


def test_a_job_sent_again_keeps_the_payload_stored_first(nats_server) -> None:
    """The same job id sent twice with other arguments: the second send finds the job stored
    and leaves its payload as it was."""
    app = App(_url(nats_server.url))
    big = app.task(name="big")(lambda text: text[:3])
    try:
        first = big.options(job_id="same").send("a" * 50_000)
        again = big.options(job_id="same").send("b" * 50_000)
        assert first.id == again.id == "same"
        assert _payload_of(app, "same") == app.get_job("same").payload
        assert app.run_until_idle() == 1
        assert first.result(timeout=10) == "aaa"
    finally:
        app.close()


def test_a_job_whose_payload_went_missing_fails_saying_so(nats_server) -> None:
    """A record that names a payload stored apart which is gone (removed outside taskmill):
    the claim fails the job with an error that says which, and nothing runs."""
    app = App(_url(nats_server.url))
    ran: list[str] = []

    @app.task(name="big")
    def big(text: str) -> None:
        ran.append(text)

    from taskmill.brokers.nats import NatsBroker

    broker = app.broker
    try:
        handle = big.send("z" * 30_000)
        assert isinstance(broker, NatsBroker)
        _on_io_loop(broker, broker._drop_payloads([handle.id]))
        assert app.run_until_idle() == 0  # the broker failed it: no job was run
        job = app.get_job(handle.id)
        assert ran == [] and job.state is JobState.FAILED and job.error is not None
        assert job.error.type == "taskmill.errors.SerializationError"
        assert "has its payload stored apart" in job.error.message
        assert broker.config.bucket("payloads") in job.error.message
    finally:
        app.close()


def test_a_payload_no_record_names_is_removed_by_the_second_sweep(nats_server) -> None:
    """A send that died between its payload and its record leaves the payload alone: the
    workers' sweeps remove it once two in a row found no record naming it (one is not
    enough: a payload is written a round trip before its record). A job's own payload
    stays."""
    app = App(_url(nats_server.url))
    app.task(name="big")(lambda text: len(text))
    from taskmill.brokers.nats import NatsBroker

    broker = app.broker
    try:
        kept = app.get_task("big").send("k" * 40_000)
        assert isinstance(broker, NatsBroker)
        _on_io_loop(broker, broker._store_payloads({"orphan": b"o" * 40_000}))
        assert set(_bucket_subjects(app, "payloads")) == {kept.id, "orphan"}

        async def sweep() -> None:
            await broker._sweep(await broker._fresh_now())

        _on_io_loop(broker, sweep())
        assert set(_bucket_subjects(app, "payloads")) == {kept.id, "orphan"}
        _on_io_loop(broker, sweep())
        assert set(_bucket_subjects(app, "payloads")) == {kept.id}
        assert app.run_until_idle() == 1
        assert kept.result(timeout=10) == 40_000
    finally:
        app.close()


def test_large_payloads_on_a_cluster_run_with_their_arguments(nats_cluster) -> None:
    """Three nodes, replicas 3, the producer on one and the worker on another: every job's
    payload stored apart is read (by direct gets, which any replica may answer) and the job
    runs with its own arguments. (A replica that has not got a payload yet, which then sends
    the read to the leader, did not happen in three runs of this with that fallback turned
    off: the payload is acknowledged by two of the three nodes a round trip before its job's
    pointer is written.)"""
    nodes = nats_cluster.urls
    options = f"prefix=c{uuid.uuid4().hex[:10]}&replicas=3"
    producer = App(f"{nodes[2]}?{options}")
    worker = App(f"{nodes[0]}?{options}")
    for app in (producer, worker):
        app.task(name="digits")(lambda n, text: text.count(str(n % 10)) == len(text))
    try:
        sent = producer.get_task("digits").send_many(
            [(n, str(n % 10) * 20_000) for n in range(200)]
        )
        with running_worker(worker, concurrency=16):
            assert all(h.result(timeout=60) is True for h in sent)
        assert all(producer.get_job(h.id).state is JobState.SUCCEEDED for h in sent)
    finally:
        producer.close()
        worker.close()


def test_a_claims_unneeded_pointers_wait_for_its_next_claim(
    nats_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim of one job pulls a window of 8 pointers: the 7 it does not take wait for the
    worker's next claim instead of being handed back and delivered again (each was, 7 times
    a job, for a worker claiming one at a time), and go back to the others once no claim
    came within ``KEEP_S`` (1 s here instead of 20 ms, so that a loaded machine's pause
    between two claims does not hand them back early)."""
    from taskmill.brokers.nats import NatsBroker, dispatch
    from taskmill.brokers.nats.config import consumer_name

    monkeypatch.setattr(dispatch, "KEEP_S", 1.0)

    app = App(_url(nats_server.url))
    other = App(app.broker.url)
    for each in (app, other):
        each.task(name="one")(lambda n: n)
    broker = app.broker
    try:
        sent = app.get_task("one").send_many([(n,) for n in range(12)])
        assert isinstance(broker, NatsBroker)

        async def kept() -> int:
            return sum(len(lane.kept) for lane in (await broker._session()).lanes.values())

        async def claim_one_by_one() -> tuple[list[str], int, int]:
            await broker.attach()
            ids = []
            for _ in range(4):  # back to back, as a worker finishing one job at a time
                (job,) = await broker.claim(["default"], 1, "w1", 30.0)
                ids.append(job.id)
            held = await kept()
            session = await broker._session()
            info = await session.nc.jetstream().consumer_info(
                broker.config.dispatch_stream, consumer_name("default", 0)
            )
            # no claim comes: the kept ones go back to the others
            await await_until(_none_kept, timeout=20, interval=0.05)
            return ids, int(info.num_redelivered or 0), held

        async def _none_kept() -> bool:
            return await kept() == 0

        loop = asyncio.new_event_loop()
        try:
            ids, redelivered, held = loop.run_until_complete(claim_one_by_one())
            # another worker gets them at once, though the first is still attached
            others = other.run_sync(other.broker.claim(["default"], 8, "w2", 30.0))
            loop.run_until_complete(broker.detach())
        finally:
            loop.close()
        assert ids == [h.id for h in sent[:4]]  # in order, one at a time
        assert (redelivered, held) == (0, 7)  # nothing delivered twice; 7 kept
        assert sorted(j.id for j in others) == sorted(h.id for h in sent[4:])
    finally:
        app.close()
        other.close()


def test_a_prune_reads_no_further_than_the_first_record_stored_after_its_cutoff(
    nats_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bucket delivers its records in the order they were stored, and a record is stored
    when its job finishes or later: a prune stops at the first record stored after its
    cutoff. With results kept for days, every worker's prune read the whole bucket each
    minute to find nothing."""
    app = App(_url(nats_server.url))
    task = app.task(name="quick")(lambda n: n)
    try:
        old = task.send_many([(n,) for n in range(5)])
        assert app.run_until_idle() == 5
        cutoff = app.run_sync(app.broker.now()) + 0.05
        wait_until(lambda: app.run_sync(app.broker.now()) > cutoff + 0.05, timeout=10)
        new = task.send_many([(n,) for n in range(200)])
        assert app.run_until_idle() == 200

        read: list[str] = []
        scan = type(app.broker)._scan_messages

        async def counted(self: Any, what: str) -> Any:
            async for key, entry in scan(self, what):
                read.append(key)
                yield key, entry

        monkeypatch.setattr(type(app.broker), "_scan_messages", counted)
        assert app.run_sync(app.broker.prune(cutoff)) == 5
        assert len(read) == 6, read  # the 5 pruned, and the first newer one
        assert {h.id for h in new} <= set(all_jobs(app))
        for h in old:
            with pytest.raises(JobNotFoundError):
                app.get_job(h.id)
    finally:
        app.close()
