"""An in-process broker for users' tests and for eager mode: ``App("memory://")``.

Same contract and semantics as the others, held in dicts under one lock so a producer thread,
the app's portal loop and an in-process worker can share it. Not shared across processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import itertools
import os
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from taskmill.brokers._rows import recovered_error
from taskmill.brokers.base import (
    Broker,
    Capabilities,
    EnqueueResult,
    HandOver,
    HeartbeatReply,
    JobPage,
    JobQuery,
    OnConflict,
    decode_cursor,
    encode_cursor,
)
from taskmill.brokers.features import (
    EventBus,
    LimitStore,
    ScheduleStore,
    Subscription,
    WorkflowRecord,
    WorkflowStore,
)
from taskmill.errors import DuplicateJobError
from taskmill.job import (
    FINISHED_STATES,
    Cancelled,
    Claim,
    Failed,
    Finish,
    Job,
    JobState,
    NewJob,
    Progress,
    QueueStats,
    Released,
    RetryAt,
    Succeeded,
    WorkerInfo,
)


class MemoryBroker(Broker, ScheduleStore, WorkflowStore, LimitStore, EventBus):
    name = "memory"
    capabilities = Capabilities(
        shared_across_processes=False,
        server_clock=False,
        transactional_enqueue=False,
        push_wakeups=True,
    )

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._schedule_marks: dict[str, float] = {}
        self._workflows: dict[str, WorkflowRecord] = {}
        self._rate_tat: dict[str, float] = {}
        self._slots: dict[str, dict[str, float]] = {}
        self._subscribers: set[_MemorySubscription] = set()
        self._seq: dict[str, int] = {}
        self._counter = itertools.count()
        self._ready: dict[str, list[tuple[int, float, int, str]]] = {}
        self._scheduled: list[tuple[float, int, str]] = []
        self._keys: dict[str, str] = {}
        self._paused: set[str] = set()
        self._workers: dict[str, WorkerInfo] = {}
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        # bumped on every notify; a loop's wait returns at once if it changed since that loop's
        # last claim, so a notify between an empty claim and the wait is not missed
        self._version = 0
        self._seen: dict[asyncio.AbstractEventLoop, int] = {}

    # --- internals (lock held) --------------------------------------------------------------

    def _push_ready(self, job: Job) -> None:
        entry = (-job.priority, job.run_at, self._seq[job.id], job.id)
        heapq.heappush(self._ready.setdefault(job.queue, []), entry)

    def _promote(self, now: float) -> None:
        while self._scheduled and self._scheduled[0][0] <= now:
            _, _, job_id = heapq.heappop(self._scheduled)
            job = self._jobs.get(job_id)
            if job is not None and job.state is JobState.SCHEDULED and job.run_at <= now:
                job.state = JobState.QUEUED
                self._push_ready(job)

    def _make_waiting(self, job: Job, now: float) -> None:
        if job.run_at <= now:
            job.state = JobState.QUEUED
            self._push_ready(job)
        else:
            job.state = JobState.SCHEDULED
            heapq.heappush(self._scheduled, (job.run_at, self._seq[job.id], job.id))

    def _release_key(self, job: Job) -> None:
        if job.key is not None and self._keys.get(job.key) == job.id:
            del self._keys[job.key]

    def _notify(self) -> None:
        self._version += 1
        waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            loop.call_soon_threadsafe(_resolve, fut)

    def _holds(self, claim: Claim) -> Job | None:
        job = self._jobs.get(claim.job_id)
        if job is None or job.state is not JobState.RUNNING or job.lease_token != claim.token:
            return None
        return job

    @staticmethod
    def _copy(job: Job) -> Job:
        return msgspec.structs.replace(job)

    # --- producers ----------------------------------------------------------------------------

    async def enqueue(
        self, jobs: Sequence[NewJob], *, on_conflict: OnConflict = "return"
    ) -> EnqueueResult:
        return self._enqueue(jobs, on_conflict)

    def enqueue_blocking(
        self,
        jobs: Sequence[NewJob],
        *,
        on_conflict: OnConflict = "return",
        connection: Any = None,
    ) -> EnqueueResult:
        if connection is not None:
            raise TypeError("the memory broker has no transactions: connection= is not supported")
        return self._enqueue(jobs, on_conflict)

    def _enqueue(self, jobs: Sequence[NewJob], on_conflict: OnConflict) -> EnqueueResult:
        now = time.time()
        result = EnqueueResult(ids=[j.id for j in jobs])
        with self._lock:
            batch_keys: dict[str, str] = {}
            batch_ids: set[str] = set()
            for i, j in enumerate(jobs):
                if j.id in self._jobs or j.id in batch_ids:  # stored already: the same job
                    result.existing.add(i)
                    continue
                batch_ids.add(j.id)
                if j.key is None:
                    continue
                existing = self._keys.get(j.key) or batch_keys.get(j.key)
                if existing is not None:
                    if on_conflict == "raise":
                        raise DuplicateJobError(j.key, existing)
                    result.ids[i] = existing
                    result.existing.add(i)
                else:
                    batch_keys[j.key] = j.id
            for i, j in enumerate(jobs):
                if i in result.existing:
                    continue
                job = Job(
                    id=j.id,
                    task=j.task,
                    queue=j.queue,
                    state=JobState.QUEUED,
                    payload=j.payload,
                    priority=j.priority,
                    max_attempts=j.max_attempts,
                    run_at=j.run_at if j.run_at is not None else now + j.delay_s,
                    enqueued_at=now,
                    timeout_s=j.timeout_s,
                    key=j.key,
                    meta=dict(j.meta),
                )
                self._jobs[job.id] = job
                self._seq[job.id] = next(self._counter)
                if job.key is not None:
                    self._keys[job.key] = job.id
                self._make_waiting(job, now)
            self._notify()
        return result

    # --- workers ------------------------------------------------------------------------------

    async def claim(
        self, queues: Sequence[str], limit: int, worker_id: str, lease_s: float
    ) -> list[Job]:
        now = time.time()
        token = os.urandom(8).hex()
        claimed: list[Job] = []
        loop = asyncio.get_running_loop()
        with self._lock:
            self._seen[loop] = self._version
            self._promote(now)
            heaps = [self._ready[q] for q in queues if q not in self._paused and q in self._ready]
            while len(claimed) < limit:
                best: list[tuple[int, float, int, str]] | None = None
                for heap in heaps:
                    while heap and self._jobs.get(heap[0][3], _GONE).state is not JobState.QUEUED:
                        heapq.heappop(heap)  # stale entry: cancelled, purged or re-queued since
                    if heap and (best is None or heap[0] < best[0]):
                        best = heap
                if best is None:
                    break
                job = self._jobs[heapq.heappop(best)[3]]
                job.state = JobState.RUNNING
                job.attempt += 1
                job.lease_token = token
                job.lease_expires_at = now + lease_s
                job.worker_id = worker_id
                job.started_at = now
                job.cancel_requested = False
                claimed.append(self._copy(job))
        return claimed

    async def heartbeat(
        self, worker: WorkerInfo, claims: Sequence[Claim], lease_s: float
    ) -> HeartbeatReply:
        now = time.time()
        reply = HeartbeatReply()
        with self._lock:
            for claim in claims:
                job = self._holds(claim)
                if job is None:
                    reply.lost.add(claim.job_id)
                    continue
                job.lease_expires_at = now + lease_s
                if job.cancel_requested:
                    reply.cancel_requested.add(claim.job_id)
            self._workers[worker.id] = msgspec.structs.replace(worker, heartbeat_at=now)
        return reply

    async def finish(self, finishes: Sequence[Finish]) -> list[bool]:
        now = time.time()
        applied: list[bool] = []
        with self._lock:
            for f in finishes:
                job = self._holds(f.claim)
                applied.append(job is not None)
                if job is None:
                    continue
                o = f.outcome
                job.lease_token = None
                job.lease_expires_at = None
                if isinstance(o, Succeeded):
                    job.state, job.result, job.finished_at = JobState.SUCCEEDED, o.result, now
                elif isinstance(o, Failed):
                    job.state, job.error, job.finished_at = JobState.FAILED, o.error, now
                elif isinstance(o, Cancelled):
                    job.state, job.finished_at = JobState.CANCELLED, now
                elif isinstance(o, RetryAt):
                    job.error, job.run_at, job.worker_id = o.error, o.run_at, None
                    self._make_waiting(job, now)
                elif isinstance(o, Released):
                    job.attempt = max(0, job.attempt - 1)
                    job.worker_id = job.started_at = None
                    self._make_waiting(job, now)
                if job.state in FINISHED_STATES:
                    self._release_key(job)
            self._notify()
        return applied

    async def record_progress(self, items: Sequence[Progress]) -> None:
        with self._lock:
            for p in items:
                job = self._holds(p.claim)
                if job is not None:
                    job.progress, job.progress_message = p.fraction, p.message

    async def recover(self, max_lost_leases: int) -> list[tuple[str, JobState]]:
        now = time.time()
        recovered: list[tuple[str, JobState]] = []
        with self._lock:
            for job in self._jobs.values():
                if job.state is not JobState.RUNNING or (job.lease_expires_at or 0) >= now:
                    continue
                job.lost_leases += 1
                job.error = recovered_error(job.attempt, job.worker_id, job.lost_leases)
                job.lease_token = job.lease_expires_at = job.worker_id = None
                if job.cancel_requested:
                    job.state, job.finished_at = JobState.CANCELLED, now
                elif job.lost_leases >= max_lost_leases:
                    job.state, job.finished_at = JobState.FAILED, now
                else:
                    job.state = JobState.QUEUED
                    self._push_ready(job)
                if job.state in FINISHED_STATES:
                    self._release_key(job)
                recovered.append((job.id, job.state))
            if recovered:
                self._notify()
        return recovered

    async def wait(
        self, queues: Sequence[str], timeout: float, handover: HandOver | None = None
    ) -> list[Job]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self._seen.get(loop, -1) != self._version:
                self._seen[loop] = self._version
                return []
            if self._scheduled:
                timeout = min(timeout, max(0.0, self._scheduled[0][0] - time.time()))
            self._waiters.append((loop, fut))
        try:
            async with asyncio.timeout(timeout):
                await fut
        except TimeoutError:
            pass
        finally:
            with self._lock:
                if (loop, fut) in self._waiters:
                    self._waiters.remove((loop, fut))
        return []

    async def unregister_worker(self, worker_id: str) -> None:
        with self._lock:
            self._workers.pop(worker_id, None)

    async def prune(self, finished_before: float, limit: int = 1000) -> int:
        with self._lock:
            old = [
                j.id
                for j in self._jobs.values()
                if j.state in FINISHED_STATES and (j.finished_at or 0) < finished_before
            ][:limit]
            for job_id in old:
                del self._jobs[job_id]
                del self._seq[job_id]
            for w in [
                w for w in self._workflows.values() if (w.finished_at or 1e100) < finished_before
            ]:
                del self._workflows[w.id]
        return len(old)

    # --- inspection and management ----------------------------------------------------------

    async def now(self) -> float:
        return time.time()

    async def get(self, job_id: str) -> Job | None:
        with self._lock:
            job = self._jobs.get(job_id)
            return None if job is None else self._copy(job)

    async def get_many(self, job_ids: Sequence[str]) -> list[Job | None]:
        with self._lock:
            found = [self._jobs.get(job_id) for job_id in job_ids]
            return [None if job is None else self._copy(job) for job in found]

    async def get_by_key(self, key: str) -> Job | None:
        with self._lock:
            job = self._jobs.get(self._keys.get(key, ""))
            return None if job is None or job.state.finished else self._copy(job)

    async def find_jobs(
        self, query: JobQuery, *, limit: int = 100, cursor: str | None = None, count: bool = False
    ) -> JobPage:
        with self._lock:
            found = [j for j in self._jobs.values() if query.matches(j)]
            keyed: list[tuple[tuple[float, ...], Job]]
            if query.order == "finished":
                keyed = sorted(((j.finished_at or 0.0, self._seq[j.id]), j) for j in found)
            else:
                keyed = [((self._seq[j.id],), j) for j in found]
            keyed.reverse()
            if cursor is not None:
                after = tuple(decode_cursor(cursor, query.order, _CURSOR_TYPES[query.order]))
                keyed = [(k, j) for k, j in keyed if k < after]
            page = [(k, self._copy(j)) for k, j in keyed[:limit]]
        more = len(keyed) > limit
        return JobPage(
            jobs=[j for _, j in page],
            next_cursor=encode_cursor(query.order, *page[-1][0]) if more else None,
            total=len(found) if count else None,
        )

    async def finished_per_minute(
        self, since: float, queue: str | None = None
    ) -> list[tuple[int, JobState, int]]:
        counted: dict[tuple[int, JobState], int] = {}
        with self._lock:
            for j in self._jobs.values():
                at = j.finished_at
                of_queue = queue is None or j.queue == queue
                if of_queue and j.state in FINISHED_STATES and at is not None and at >= since:
                    key = (int(at // 60), j.state)
                    counted[key] = counted.get(key, 0) + 1
        return [(minute, state, n) for (minute, state), n in counted.items()]

    async def delete(self, job_ids: Sequence[str]) -> list[str]:
        deleted: list[str] = []
        with self._lock:
            for job_id in job_ids:
                job = self._jobs.get(job_id)
                if job is not None and job.state in FINISHED_STATES:
                    del self._jobs[job_id]
                    del self._seq[job_id]
                    deleted.append(job_id)
        return deleted

    async def stats(self) -> list[QueueStats]:
        now = time.time()
        with self._lock:
            out: dict[str, QueueStats] = {}
            for q in self._paused:
                out[q] = QueueStats(q, {s.value: 0 for s in JobState}, None, True)
            for j in self._jobs.values():
                qs = out.setdefault(j.queue, QueueStats(j.queue, {s.value: 0 for s in JobState}))
                qs.counts[j.state.value] += 1
                if j.state is JobState.QUEUED:
                    age = max(0.0, now - j.run_at)
                    qs.oldest_waiting_s = max(qs.oldest_waiting_s or 0.0, age)
            for stats in out.values():
                stats.paused = stats.queue in self._paused
        return [out[name] for name in sorted(out)]

    async def list_workers(self) -> list[WorkerInfo]:
        with self._lock:
            return sorted(self._workers.values(), key=lambda w: w.started_at)

    async def retry(self, job_ids: Sequence[str] | None) -> list[str]:
        now = time.time()
        done: list[str] = []
        with self._lock:
            if job_ids is None:
                job_ids = [j.id for j in self._jobs.values() if j.state is JobState.FAILED]
            for job_id in job_ids:
                job = self._jobs.get(job_id)
                if job is None or job.state not in (JobState.FAILED, JobState.CANCELLED):
                    continue
                if job.key is not None and job.key in self._keys:
                    continue  # another job with this key is pending
                job.attempt = job.lost_leases = 0
                job.run_at, job.finished_at, job.started_at = now, None, None
                job.cancel_requested = False
                if job.key is not None:
                    self._keys[job.key] = job.id
                self._make_waiting(job, now)
                done.append(job_id)
            if done:
                self._notify()
        return done

    async def cancel(self, job_id: str) -> JobState | None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            if job.state in (JobState.SCHEDULED, JobState.QUEUED):
                job.state, job.finished_at = JobState.CANCELLED, time.time()
                self._release_key(job)
            elif job.state is JobState.RUNNING:
                job.cancel_requested = True
            return job.state

    async def run_now(self, job_id: str) -> JobState | None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            before = job.state
            if before is JobState.SCHEDULED:
                job.run_at = time.time()
                self._make_waiting(job, job.run_at)  # its stale heap entry is skipped later
                self._notify()
            return before

    async def purge(self, queue: str) -> int:
        with self._lock:
            doomed = [
                j
                for j in self._jobs.values()
                if j.queue == queue and j.state in (JobState.SCHEDULED, JobState.QUEUED)
            ]
            for job in doomed:
                self._release_key(job)
                del self._jobs[job.id]
                del self._seq[job.id]
        return len(doomed)

    async def pause(self, queue: str, paused: bool) -> None:
        with self._lock:
            if paused:
                self._paused.add(queue)
            else:
                self._paused.discard(queue)
                self._notify()

    async def schedule_marks(self) -> dict[str, float]:
        with self._lock:
            return dict(self._schedule_marks)

    async def mark_schedules(self, marks: Mapping[str, float]) -> None:
        with self._lock:
            for name, tick in marks.items():
                self._schedule_marks[name] = max(tick, self._schedule_marks.get(name, tick))

    async def save_workflow(self, workflow_id: str, spec: bytes) -> None:
        with self._lock:
            if workflow_id not in self._workflows:
                self._workflows[workflow_id] = WorkflowRecord(
                    workflow_id, spec, "running", time.time()
                )

    async def get_workflow(self, workflow_id: str) -> WorkflowRecord | None:
        with self._lock:
            return self._workflows.get(workflow_id)

    async def end_workflow(self, workflow_id: str, state: str) -> bool:
        with self._lock:
            record = self._workflows.get(workflow_id)
            if record is None or record.state != "running":
                return False
            self._workflows[workflow_id] = dataclasses.replace(
                record, state=state, finished_at=time.time()
            )
            return True

    async def reopen_workflow(self, workflow_id: str) -> bool:
        with self._lock:
            record = self._workflows.get(workflow_id)
            if record is None or record.state != "failed":
                return False
            self._workflows[workflow_id] = dataclasses.replace(
                record, state="running", finished_at=None
            )
            return True

    async def running_workflows(self, limit: int = 1000) -> list[str]:
        with self._lock:
            running = [w for w in self._workflows.values() if w.state == "running"]
        return [w.id for w in sorted(running, key=lambda w: w.created_at)[:limit]]

    async def reserve_rate_slot(self, bucket: str, interval_s: float) -> float:
        now = time.time()
        with self._lock:
            start = max(self._rate_tat.get(bucket, now), now)
            self._rate_tat[bucket] = start + interval_s
        return start - now

    async def acquire_slot(self, bucket: str, holder: str, limit: int, ttl_s: float) -> bool:
        now = time.time()
        with self._lock:
            holders = self._slots.setdefault(bucket, {})
            for gone in [h for h, expires in holders.items() if expires <= now]:
                del holders[gone]
            if holder not in holders and len(holders) >= limit:
                return False
            holders[holder] = now + ttl_s
            return True

    async def release_slot(self, bucket: str, holder: str) -> None:
        with self._lock:
            self._slots.get(bucket, {}).pop(holder, None)

    async def queue_depth(self, queue: str) -> int:
        with self._lock:
            return sum(
                1
                for j in self._jobs.values()
                if j.queue == queue and j.state in (JobState.SCHEDULED, JobState.QUEUED)
            )

    async def publish_events(self, payload: bytes) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for sub in subscribers:
            sub.deliver(payload)

    def events_subscription(self) -> Subscription:
        return _MemorySubscription(self)


class _MemorySubscription(Subscription):
    def __init__(self, broker: MemoryBroker) -> None:
        self._broker = broker
        self._queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()

    def deliver(self, payload: bytes) -> None:  # from any thread
        with contextlib.suppress(RuntimeError):  # the subscriber's loop has closed
            self._loop.call_soon_threadsafe(self._queue.put_nowait, payload)

    async def start(self) -> None:
        with self._broker._lock:
            self._broker._subscribers.add(self)

    async def get(self) -> bytes:
        return await self._queue.get()

    async def close(self) -> None:
        with self._broker._lock:
            self._broker._subscribers.discard(self)


_CURSOR_TYPES: dict[str, tuple[type, ...]] = {"enqueued": (int,), "finished": (float, int)}


class _Gone:
    state = None


_GONE: Any = _Gone()


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
