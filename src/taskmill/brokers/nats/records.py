"""What the NATS broker stores: a job's record (the truth, in a KV bucket) and the small
dispatch message that points a worker at it.

A record changes only by compare-and-set on its KV revision. ``gen`` counts the times the job
was dispatched (sent, retried, recovered, run now): a pointer names the ``gen`` it was made
for, and one whose ``gen`` is no longer the record's is stale and dropped. A send writes the
pointer with its record, and the pointer carries the job while its payload is small, so a
worker that reads it before the record exists creates the record itself (see ``broker.py``).

A payload larger than ``APART_BYTES`` is stored once, in the ``payloads`` bucket, before its
record: the record (``apart``) holds none, so a claim, a heartbeat, a finish, a retry and every
scan of the ``jobs`` bucket move a few hundred bytes instead of the payload each time.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from taskmill.job import Job, JobState, NewJob

POINTER_JOB_MAX_BYTES = 16 * 1024
"""A pointer carries the whole job up to this size of payload (else only its id)."""
APART_BYTES = POINTER_JOB_MAX_BYTES
"""A payload larger than this is stored apart from its record (``Record.apart``)."""


class Record(Job, array_like=True):
    """A job as the KV bucket holds it: ``Job``'s fields (in their order, as an array), then
    ``gen`` and ``seq``."""

    gen: int = 0
    seq: int = 0
    """Enqueue order: the producer's clock in nanoseconds (ties broken by id)."""
    apart: bool = False
    """The payload is in the ``payloads`` bucket (key: the job's), not here."""

    def job(self, payload: bytes | None = None) -> Job:
        """A plain ``Job`` (what the broker contract returns), its metadata a copy; ``payload``
        is the one stored apart, for a record that holds none."""
        fields = {name: getattr(self, name) for name in Job.__struct_fields__}
        fields["meta"] = dict(self.meta)
        if payload is not None:
            fields["payload"] = payload
        return Job(**fields)

    @property
    def pending(self) -> bool:
        return not self.state.finished


def new_record(job: NewJob, now: float, seq: int) -> Record:
    run_at = job.run_at if job.run_at is not None else now + job.delay_s
    return Record(
        id=job.id,
        task=job.task,
        queue=job.queue,
        state=JobState.QUEUED if run_at <= now else JobState.SCHEDULED,
        payload=job.payload,
        priority=job.priority,
        max_attempts=job.max_attempts,
        run_at=run_at,
        enqueued_at=now,
        timeout_s=job.timeout_s,
        key=job.key,
        meta=dict(job.meta),
        seq=seq,
    )


def set_apart(records: Sequence[Record]) -> dict[str, bytes]:
    """Move each payload larger than ``APART_BYTES`` out of its record: the payloads to
    store apart, by job id."""
    apart: dict[str, bytes] = {}
    for record in records:
        if len(record.payload) > APART_BYTES:
            apart[record.id] = record.payload
            record.payload = b""
            record.apart = True
    return apart


class Pointer(msgspec.Struct, array_like=True):
    """A dispatch message: which job, for which ``gen``, and the sort key of a claim
    (priority, run_at, seq). ``record`` is the job's first record, when the pointer is the
    one a send wrote and the payload is small."""

    id: str
    gen: int
    priority: int
    run_at: float
    seq: int
    record: Record | None = None


class LeaseEntry(msgspec.Struct, array_like=True):
    """What a worker holds, in the ``leases`` bucket (key: the worker's id token): found by
    ``recover`` when the worker stops renewing it."""

    worker_id: str
    expires_at: float
    claims: dict[str, str]
    """job id -> lease token."""


record_encoder = msgspec.msgpack.Encoder()
record_decoder = msgspec.msgpack.Decoder(Record)
pointer_decoder = msgspec.msgpack.Decoder(Pointer)
lease_decoder = msgspec.msgpack.Decoder(LeaseEntry)
