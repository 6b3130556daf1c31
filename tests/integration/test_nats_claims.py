"""What docs/brokers.md says of the NATS broker that no other test shows: the warnings at start
about storage that loses jobs, a job too large for the server's ``max_payload`` refused at
send, and the clock taken from the server's stamps rather than the local one. Each against the
session's ``nats-server`` under a prefix of its own."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import types
import uuid
from typing import Any

import pytest

from servers import NatsServer
from taskmill import App, JobFailedError, JobNotFoundError, PayloadTooLargeError
from taskmill.testing import await_until, running_worker, wait_until

from .support import nats_lanes_made, nats_url, on_io_loop

pytestmark = pytest.mark.timeout(60)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "taskmill.brokers.nats" and r.levelno == logging.WARNING
    ]


def test_start_warns_of_memory_storage(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    app = App(nats_url(nats_server.url, "&storage=memory"))
    try:
        with caplog.at_level(logging.WARNING, logger="taskmill.brokers.nats"):
            app.open()
    finally:
        app.close()
    assert any("in memory: a server restart loses every job" in w for w in _warnings(caplog))


def test_start_warns_of_one_replica_when_several_servers_are_named(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    hostport = nats_server.url.split("://", 1)[1]
    # the same server twice: what the broker can tell is that the URL names two
    app = App(nats_url(f"nats://{hostport},{hostport}"))
    try:
        with caplog.at_level(logging.WARNING, logger="taskmill.brokers.nats"):
            app.open()
    finally:
        app.close()
    assert any("have one replica though 2 servers are named" in w for w in _warnings(caplog))


def test_file_storage_with_one_server_warns_of_nothing(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    app = App(nats_url(nats_server.url))
    try:
        with caplog.at_level(logging.WARNING, logger="taskmill.brokers.nats"):
            app.open()
    finally:
        app.close()
    assert _warnings(caplog) == []


def test_a_job_larger_than_the_servers_max_payload_fails_at_send(nats_server: NatsServer) -> None:
    """The session's server allows 8 MB messages; taskmill's own limit raised past that, a job
    of 9 MB is refused before anything is written, naming the server's setting."""
    app = App(nats_url(nats_server.url), max_payload_bytes=16 << 20)
    blob = app.task(name="blob")(lambda data: len(data))
    try:
        handle = blob.options(job_id="too-large")
        with pytest.raises(PayloadTooLargeError, match=r"max_payload of 8388608 bytes") as info:
            handle.send("x" * (9 << 20))
        assert "raise max_payload in the server's configuration" in str(info.value)
        with pytest.raises(JobNotFoundError):
            app.get_job("too-large")
        assert blob.send("x" * (1 << 20)).status().value == "queued"  # 1 MiB fits
    finally:
        app.close()


def test_the_clock_is_the_servers_not_the_local_one(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process whose clock is an hour fast still writes the server's time: the offset it
    measures from a stored message's stamp cancels its own error."""
    from taskmill.brokers.nats import core

    fast = types.SimpleNamespace(
        time=lambda: time.time() + 3600.0, monotonic=time.monotonic, time_ns=time.time_ns
    )
    monkeypatch.setattr(core, "time", fast)
    app = App(nats_url(nats_server.url))
    try:
        server_now = app.run_sync(app.broker.now())
        assert abs(server_now - time.time()) < 0.5, "the local clock's hour leaked through"
        job = app.get_job(app.task(name="noop")(lambda: None).send().id)
        assert abs(job.enqueued_at - time.time()) < 5.0
    finally:
        app.close()


def test_a_result_too_large_for_the_server_fails_the_job_clearly(nats_server) -> None:
    """The server's max_payload bounds a record; a result that would pass it cannot be stored,
    so the job fails with an error that says why (rather than a finish retried for ever)."""
    app = App(f"{nats_server.url}?prefix=big{uuid.uuid4().hex[:8]}", max_payload_bytes=1 << 20)

    @app.task(retries=3)
    def huge() -> str:
        return "x" * (9 << 20)  # the test server allows 8 MB messages

    try:
        with running_worker(app):
            handle = huge.send()
            with pytest.raises(JobFailedError) as info:
                handle.result(timeout=20)
        assert info.value.type == "taskmill.errors.PayloadTooLargeError"
        assert "max_payload" in info.value.message
        assert app.get_job(handle.id).attempt == 1, "a result too large is not retried"
    finally:
        app.close()


def test_a_lease_entry_older_than_its_jobs_leases_is_kept_until_they_run_out(
    nats_server: NatsServer,
) -> None:
    """A claim's write of the worker's lease entry, its expiry taken before a heartbeat
    extended the jobs, can land after the heartbeat's: the entry then runs out before the
    jobs' own leases. ``recover`` used to delete such an entry, so a worker killed then left
    its jobs to the 30 s sweep (found reading the code while looking into T18's slow NATS
    restarts, which had another cause). Staged: the entry written back to an earlier
    expiry."""
    from taskmill.brokers.nats.config import token
    from taskmill.job import Claim, JobState, WorkerInfo

    app = App(nats_url(nats_server.url))
    noop = app.task(name="noop")(lambda: None)
    broker: Any = app.broker
    try:
        job_id = noop.send().id

        async def scenario() -> list[tuple[str, JobState]]:
            broker._sweep_at = time.monotonic() + 3600  # only the lease entry can recover it
            (job,) = await broker.claim(["default"], 1, "w1", 30.0)
            now = await broker._fresh_now()
            info = WorkerInfo("w1", "host", 1, ["default"], 8, now, now)
            await broker.heartbeat(info, [Claim(job_id, job.lease_token)], 1.5)
            await broker._write_lease("w1", now + 0.3)  # the claim's write, landing late

            async def entry_ran_out() -> bool:
                return await broker._fresh_now() > now + 0.3

            await await_until(entry_ran_out, what="the lease entry to run out")
            assert await broker.recover(5) == []  # the job's own lease runs on
            entry = await broker._get("leases", token("w1"))
            assert entry is not None and not entry.deleted, "the entry was deleted"

            async def recovered() -> list[tuple[str, JobState]]:
                return await broker.recover(5)

            return await await_until(recovered, what="the job to be recovered", timeout=10)

        assert on_io_loop(app, scenario()) == [(job_id, JobState.QUEUED)]
        assert app.get_job(job_id).state is JobState.QUEUED
    finally:
        app.close()


def _lane_under_a_long_pull(app: App) -> tuple[Any, Any]:
    """The default queue's lane, with an idle worker's long pull out on it."""
    from taskmill.brokers.nats.config import consumer_name

    broker: Any = app.broker
    app.open()

    async def start() -> tuple[Any, Any]:
        await broker._ensure_lane("default", 0)
        session = await broker._session()
        lane = await broker._lane(session, consumer_name("default", 0))
        await lane.long_pull(30.0, time.monotonic())
        await session.nc.flush()
        return session, lane

    return on_io_loop(app, start())


def test_only_a_wait_that_takes_hand_overs_leaves_a_long_pull(nats_server: NatsServer) -> None:
    """run_until_idle's worker waits without a hand-over and cancels the wait when one of its
    jobs ends. A long pull left by such a wait is served before the next claim: a chain step
    stored meanwhile went to it, the claim found nothing, and run_until_idle ended with the
    step due (a conformance test timed out on it once in CI). Such a wait sends none."""
    from taskmill.brokers.base import HandOver
    from taskmill.brokers.nats.config import consumer_name

    app = App(nats_url(nats_server.url))
    broker: Any = app.broker
    try:
        app.open()

        async def pulls_waiting_after(handover: Any) -> int:
            # cancelled as run_until_idle's worker cancels it: before its 10 s are up
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(broker.wait(["default"], 10.0, handover), 0.3)
            session = await broker._session()
            js = session.nc.jetstream()
            name = consumer_name("default", 0)
            info = await js.consumer_info(broker.config.dispatch_stream, name)
            return int(info.num_waiting)

        on_io_loop(app, nats_lanes_made(broker, ["default"]))
        assert on_io_loop(app, pulls_waiting_after(None)) == 0
        assert on_io_loop(app, pulls_waiting_after(HandOver("w1", 30.0))) == 1
    finally:
        app.close()


def test_a_closing_worker_hands_back_what_its_long_pull_received(nats_server: NatsServer) -> None:
    """A message a long pull brought that no claim took is handed back when the worker closes,
    so the next worker gets it now, not when the ack wait (here 60 s) runs out."""
    url = nats_url(nats_server.url, "&ack_wait=60")
    first = App(url)
    try:
        session, lane = _lane_under_a_long_pull(first)
        subject = first.broker.config.lane_subject("default", 0)  # type: ignore[attr-defined]
        on_io_loop(first, session.nc.publish(subject, b"received, never claimed"))
        wait_until(lambda: len(lane.spare) == 1, timeout=10, what="the long pull's delivery")
    finally:
        first.close()
    second = App(url)
    try:
        from taskmill.brokers.nats.config import consumer_name

        broker: Any = second.broker
        second.open()

        async def claim() -> list[bytes]:
            session = await broker._session()
            lane = await broker._lane(session, consumer_name("default", 0))
            taken = await lane.pull(4, 10.0)
            return [m.data for m in taken]

        started = time.monotonic()
        assert on_io_loop(second, claim()) == [b"received, never claimed"]
        assert time.monotonic() - started < 10
    finally:
        second.close()


def test_a_heartbeat_keeps_in_the_lease_entry_a_claim_that_landed_during_it(
    nats_server: NatsServer,
) -> None:
    """A worker lists its claims when a heartbeat begins; a claim that lands meanwhile must
    stay in the worker's lease entry, which `recover` reads when the worker dies. The heartbeat
    used to replace the entry with its list: a worker killed then left that job to the 30 s
    sweep (found by the T1 crash storm in tests/faults). Staged here: two jobs claimed, then
    a heartbeat that lists only the first."""
    from taskmill.brokers.nats.config import token
    from taskmill.brokers.nats.records import lease_decoder
    from taskmill.job import Claim, WorkerInfo

    app = App(nats_url(nats_server.url))
    noop = app.task(name="noop")(lambda: None)
    broker: Any = app.broker
    try:
        first, second = noop.send().id, noop.send().id

        async def scenario() -> dict[str, str]:
            claimed = await broker.claim(["default"], 2, "w1", 30.0)
            assert {j.id for j in claimed} == {first, second}
            tokens = {j.id: j.lease_token for j in claimed}
            now = time.time()
            info = WorkerInfo("w1", "host", 1, ["default"], 8, now, now)
            await broker.heartbeat(info, [Claim(first, tokens[first])], 30.0)
            entry = await broker._get("leases", token("w1"))
            return dict(lease_decoder.decode(entry.value).claims)

        held = on_io_loop(app, scenario())
        assert set(held) == {first, second}
    finally:
        app.close()


@pytest.mark.parametrize(
    "late_s",
    [
        pytest.param(0.005, id="read-again"),
        pytest.param(0.04, id="handed-back-then-looked-for"),
    ],
)
def test_a_claim_waits_a_little_for_a_record_whose_pointer_came_first(
    nats_server: NatsServer, late_s: float
) -> None:
    """A dispatch writes its pointer, then its record. A claim that meets the pointer first
    reads the record again for about 20 ms before it hands the pointer back for 50 ms: a
    flush releasing a workflow's next step, on the same loop as a claim, hid the step from
    run_until_idle's last claim, which ended with the step queued (a conformance test failed
    so in CI). The record lands ``late_s`` after its pointer: 5 ms, and the claim's reads
    find it; 40 ms, later than they look, and the claim, having found nothing else, waits
    for the pointer to be delivered again. Either way the claim takes the job."""
    import msgspec

    from taskmill.brokers.nats.config import token
    from taskmill.brokers.nats.records import record_encoder
    from taskmill.job import JobState

    app = App(nats_url(nats_server.url))
    broker: Any = app.broker

    @app.task(name="step")
    def step() -> None: ...

    try:
        app.open()
        job_id = step.send().id
        first = app.run_sync(broker.claim(["default"], 1, "w1", 30.0))
        assert [j.id for j in first] == [job_id]

        async def dispatch_then_claim() -> list[Any]:
            entry = await broker._get("jobs", token(job_id))
            held = msgspec.msgpack.decode(entry.value, type=broker._mine[job_id][1].__class__)
            again = msgspec.structs.replace(
                held, state=JobState.QUEUED, gen=held.gen + 1, lease_token=None,
                lease_expires_at=None, worker_id=None,
            )  # fmt: skip
            await broker._dispatch([again])  # the pointer, gen + 1; the record follows

            async def write_record() -> None:
                await asyncio.sleep(late_s)
                await broker._put(
                    "jobs", token(job_id), record_encoder.encode(again), entry.revision
                )

            writer = asyncio.create_task(write_record())
            try:
                return list(await broker.claim(["default"], 1, "w2", 30.0))
            finally:
                await writer

        second = on_io_loop(app, dispatch_then_claim())
        assert [(j.id, j.worker_id) for j in second] == [(job_id, "w2")]
    finally:
        app.close()


def test_a_claim_that_loses_its_cas_to_the_sends_own_record_claims_from_a_fresh_read(
    nats_server: NatsServer,
) -> None:
    """A claim read no record for a new job's pointer (the send's record not stored yet), so
    it creates the record from the pointer; the send's record lands first and the claim's
    write loses. The claim reads the record again and claims it: handed back instead, the
    pointer was not delivered to the pull that followed, and the claim found nothing."""
    from taskmill.brokers.nats.config import consumer_name

    app = App(nats_url(nats_server.url))
    broker: Any = app.broker

    @app.task(name="step")
    def step() -> None: ...

    try:
        app.open()
        job_id = step.send().id
        real_get_many = broker._get_many
        reads: list[list[str]] = []

        async def not_written_at_first(what: str, keys: list[str]) -> list[Any]:
            entries = await real_get_many(what, keys)
            if what == "jobs":
                reads.append(keys)
                if len(reads) == 1:
                    return [None] * len(keys)  # read before the send's record landed
            return entries

        broker._get_many = not_written_at_first
        claimed = app.run_sync(broker.claim(["default"], 1, "w1", 30.0))
        assert len(reads) == 2, "the record was not read again after the lost write"
        assert [(j.id, j.worker_id) for j in claimed] == [(job_id, "w1")]

        async def redelivered() -> int:
            session = await broker._session()
            js = session.nc.jetstream()
            info = await js.consumer_info(
                broker.config.dispatch_stream, consumer_name("default", 0)
            )
            return int(info.num_redelivered)

        assert on_io_loop(app, redelivered()) == 0, "the pointer was handed back"
    finally:
        app.close()


def test_a_claim_just_after_kept_pointers_were_handed_back_still_finds_their_jobs(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim that needs one job pulls a window and keeps the rest for the next claim,
    handing them back after ``KEEP_S``. nats-server applies a hand-back after a pull sent
    just after it: a claim right then found nothing, though a job was queued (in about one
    round in three here; five rounds). The pointer is kept for 30 s here, then handed back
    by the test, so a slow machine cannot hand it back early."""
    from taskmill.brokers.nats import dispatch
    from taskmill.brokers.nats.config import consumer_name

    app = App(nats_url(nats_server.url))
    broker: Any = app.broker

    @app.task(name="step")
    def step(i: int) -> None: ...

    async def claim_after_the_hand_back() -> list[str]:
        monkeypatch.setattr(dispatch, "KEEP_S", 30.0)
        first = await broker.claim(["default"], 1, "w1", 30.0)
        session = await broker._session()
        lane = session.lanes[consumer_name("default", 0)]
        assert len(lane.kept) == 1, "the second pointer was not kept"
        lane._expiry.cancel()  # handed back below, the claim's pull sent right after
        lane._expiry = None
        monkeypatch.setattr(dispatch, "KEEP_S", 0.0)  # every kept pointer is due
        await lane._hand_back_kept()
        assert not lane.kept
        second = await broker.claim(["default"], 1, "w2", 30.0)
        return [j.id for j in first + second]

    try:
        app.open()
        for _ in range(5):
            ids = [step.send(i).id for i in range(2)]
            assert on_io_loop(app, claim_after_the_hand_back()) == ids
    finally:
        app.close()
