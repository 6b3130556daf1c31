"""The lease keeper's rule for silence (taskmill.worker.leases): a worker whose heartbeats the
broker has not taken for longer than its lease marks every job it holds lease-lost and claims
none until a heartbeat is taken again (T8 in docs/reliability.md)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import cast

import pytest

from taskmill import App, current_job
from taskmill.brokers.base import HeartbeatReply
from taskmill.brokers.memory import MemoryBroker
from taskmill.errors import BrokerUnavailableError
from taskmill.job import Claim, Finish, Job, JobState, WorkerInfo
from taskmill.testing import running_worker, wait_until
from taskmill.worker.execution import JobRun, Pipeline
from taskmill.worker.health import heartbeat_status
from taskmill.worker.leases import LeaseKeeper

pytestmark = pytest.mark.timeout(60)

LEASE_S = 0.9
HEARTBEAT_S = 0.3


class DeafBroker(MemoryBroker):
    """Refuses heartbeats while ``deaf`` (the broker unreachable for them alone): claims still
    work, so a claim the worker makes meanwhile would show. Counts heartbeats and claims."""

    def __init__(self) -> None:
        super().__init__()
        self.deaf = False
        self.heartbeats_refused = 0
        self.claims = 0

    async def heartbeat(
        self, worker: WorkerInfo, claims: Sequence[Claim], lease_s: float
    ) -> HeartbeatReply:
        if self.deaf:
            self.heartbeats_refused += 1
            raise BrokerUnavailableError("heartbeat refused by the test")
        return await super().heartbeat(worker, claims, lease_s)

    async def finish_and_claim(
        self,
        finishes: Sequence[Finish],
        queues: Sequence[str],
        limit: int,
        worker_id: str,
        lease_s: float,
    ) -> tuple[list[bool], list[Job]]:
        self.claims += 1
        return await super().finish_and_claim(finishes, queues, limit, worker_id, lease_s)


def test_a_worker_without_heartbeats_for_a_lease_drops_its_jobs_and_claims_none(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = DeafBroker()
    app = App("memory://", lease_s=LEASE_S, heartbeat_s=HEARTBEAT_S)
    app.client.use_broker(broker)

    @app.task(retries=0)
    async def long(n: int) -> int:
        if current_job().attempt == 1 and n == 0:
            await asyncio.sleep(30)  # until the worker stops it
        return n

    caplog.set_level(logging.WARNING, logger="taskmill.worker")
    try:
        with running_worker(app, concurrency=4) as worker:
            first = long.send(0)
            wait_until(lambda: app.get_job(first.id).state is JobState.RUNNING, timeout=10)
            cut = time.monotonic()
            broker.deaf = True
            wait_until(lambda: worker.out_of_contact, what="out of contact", timeout=10)
            marked_after = time.monotonic() - cut
            # the deadline counts from the send time of the last heartbeat taken, at most one
            # interval before the cut: the mark within the lease (the plan: lease + 1 s)
            assert marked_after <= LEASE_S + 1.0, marked_after
            wait_until(lambda: worker.jobs_done == 1, what="the run to be dropped", timeout=10)
            assert app.get_job(first.id).state is not JobState.SUCCEEDED  # outcome dropped

            claims = broker.claims
            second = long.send(1)
            refused = broker.heartbeats_refused
            wait_until(
                lambda: broker.heartbeats_refused >= refused + 3,
                what="three more heartbeat intervals",
                timeout=10,
            )
            assert broker.claims == claims  # no claim out of contact
            assert app.get_job(second.id).state is JobState.QUEUED
            healthy, details = heartbeat_status(
                worker.last_heartbeat_ok,
                started=0.0,
                max_age_s=100.0,
                now=time.monotonic(),
                out_of_contact=worker.out_of_contact,
            )
            assert (healthy, details["status"]) == (False, "out of contact")

            broker.deaf = False
            wait_until(lambda: not worker.out_of_contact, what="back in contact", timeout=10)
            assert second.result(timeout=10) == 1
            assert first.result(timeout=20) == 0  # recovered when its lease expired
            assert app.get_job(first.id).attempt == 2
    finally:
        app.close()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    errors = [r for r in errors if "no heartbeat taken" in r.message]
    assert len(errors) == 1, [r.message for r in errors]  # once for the episode
    lost = [r.message for r in caplog.records if "lease lost (no heartbeat taken" in r.message]
    assert lost == [m for m in lost if m.startswith(f"job {first.id} (")] and len(lost) == 1
    assert any("taken again" in r.message for r in caplog.records)


class SlowHeartbeat(MemoryBroker):
    """Answers heartbeats after ``delay_s``."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s

    async def heartbeat(
        self, worker: WorkerInfo, claims: Sequence[Claim], lease_s: float
    ) -> HeartbeatReply:
        await asyncio.sleep(self.delay_s)
        return await super().heartbeat(worker, claims, lease_s)


class NoSlots:
    """The one part of a ``Pipeline`` a heartbeat uses: no job holds a concurrency slot."""

    async def renew_slots(self, runs: list[JobRun]) -> None:
        return None


def keeper(broker: MemoryBroker, runs: dict[str, JobRun] | None = None) -> LeaseKeeper:
    info = WorkerInfo(
        id="w",
        host="h",
        pid=1,
        queues=["default"],
        concurrency=1,
        started_at=0.0,
        heartbeat_at=0.0,
        running=[],
        processed=0,
        failed=0,
    )
    return LeaseKeeper(
        broker,
        cast("Pipeline", NoSlots()),
        worker_id="w",
        lease_s=3.0,
        interval_s=1.0,
        runs={} if runs is None else runs,
        owed=list,
        info=lambda: info,
    )


def test_the_deadline_is_one_lease_after_the_send_time_of_the_last_heartbeat_taken() -> None:
    k = keeper(MemoryBroker())
    k.vouched_at = 100.0
    k.check(now=102.999)
    assert not k.out_of_contact and k.in_contact.is_set()
    k.check(now=103.0)
    assert k.out_of_contact and not k.in_contact.is_set()
    assert k.lost_contact_at == 103.0


async def test_a_slow_heartbeat_vouches_from_when_it_was_sent_not_from_its_reply() -> None:
    k = keeper(SlowHeartbeat(0.3))
    before = time.monotonic()
    await k.beat()
    after = time.monotonic()
    assert k.last_ok is not None and k.last_ok >= before + 0.3
    assert before <= k.vouched_at < after - 0.25  # the send time
    assert k.deadline() == k.vouched_at + 3.0


async def test_a_heartbeat_taken_after_an_episode_ends_it_and_vouches_from_then() -> None:
    k = keeper(SlowHeartbeat(0.0))
    k.vouched_at = time.monotonic() - 10.0
    k.check()
    assert k.out_of_contact
    await k.beat()
    assert not k.out_of_contact and k.in_contact.is_set()
    # the jobs held through the episode were marked lost: the claims from here on count
    assert k.deadline() > time.monotonic() + 2.9
