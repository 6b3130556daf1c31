"""The checker: the ledger read against the broker's final job states (Jepsen's total-queue
check, adapted). ``check`` is pure: its unit tests feed it hand-made records.

How each figure counts (docs/reliability.md says the same):

- ``lost``: an enqueue acknowledged (``ok``) whose job has no completed execution.
- ``unexpected``: a job that ran but was never enqueued with outcome ``ok`` or ``unknown``
  (an ``error`` outcome says the job was not stored; running it anyway is unexpected).
- ``duplicated``: a job with more than one completed execution (job id -> count).
- ``recovered``: an ``unknown``-outcome enqueue whose job the broker has or ran (no other
  attempt for it), or that a later send of the same id found stored (``existing``).
- ``stuck``: a job the broker still holds in a non-terminal state after the drain.
- ``unexplained_duplicates``: a duplicated job with an earlier completed execution whose
  process was not killed by a recorded fault between that execution's start and the next
  execution's start, and with no broker fault (``BROKER_FAULTS``: the broker killed, the
  workers' connections killed, the broker's replies dropped) lasting into that span: only
  those can have cost it its lease or its acknowledgement.
- ``unexplained_interruptions``: an execution cut short (no end recorded) with no recorded
  kill of its process after its start: a process died that the test did not kill.
- ``given_up``: jobs the caller names as given up by their own worker (its lease lost with no
  heartbeat taken within it, by the worker's log): run again by design, so their duplicates
  and executions cut short are explained; those the give-up alone explains are listed.
- ``quarantined``: jobs the caller names as failed by the crash-poison rule (``max_lost_leases``
  leases lost, the broker's ``WorkerLostError``) that have no completed execution and at least
  one execution cut short by a recorded kill of its process: a job running at that many kills
  of a crash storm is failed on purpose (T10's rule), visibly, not lost. Listed, not counted
  as lost; one the ledger shows no kill of stays lost.
- ``recovery_times``: for every execution followed by another of the same job whose process
  was killed in between (cut short, or completed but not acknowledged), seconds from the kill
  to the start of the job's next execution.

A kill's time is taken just after the signal was sent, so every execution of the killed
process started before it.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from faults.ledger import Execution, Fault, Outcome, Records

TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})

KILL = "kill -9"
"""A worker process killed (its ``pid``)."""
BROKER_KILL = "broker kill -9"
"""The broker's server killed (``t``) and back, accepting connections (``t_end``)."""
CONNECTION_KILL = "connection kill"
"""The workers' connections to the broker killed by the server (``CLIENT KILL``,
``pg_terminate_backend``) or reset by the fault proxy."""
DROP_REPLIES = "drop replies"
"""The broker's replies to the workers thrown away from ``t`` to ``t_end`` (the proxy)."""
BROKER_FAULTS = frozenset({BROKER_KILL, CONNECTION_KILL, DROP_REPLIES})
"""Faults of the broker or of every worker's connection to it: any worker's lease or
acknowledgement may be lost to them, whatever its pid."""


@dataclass
class CheckResult:
    enqueued_ok: int
    executions: int
    completed: int
    kills: int
    broker_faults: int = 0
    lost: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    duplicated: dict[str, int] = field(default_factory=dict)
    recovered: list[str] = field(default_factory=list)
    stuck: dict[str, str] = field(default_factory=dict)
    unexplained_duplicates: list[str] = field(default_factory=list)
    interrupted: int = 0
    unexplained_interruptions: list[str] = field(default_factory=list)
    given_up: list[str] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)
    recovery_times: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No loss, nothing unexpected, nothing stuck, every duplicate and every execution
        cut short explained by a kill."""
        return not (
            self.lost
            or self.unexpected
            or self.stuck
            or self.unexplained_duplicates
            or self.unexplained_interruptions
        )

    @property
    def duplicates(self) -> int:
        """Completed executions beyond the first, over all jobs."""
        return sum(n - 1 for n in self.duplicated.values())

    def summary(self) -> str:
        times = sorted(self.recovery_times)
        recovery = (
            f"recovery median {times[len(times) // 2]:.2f} s max {times[-1]:.2f} s (n={len(times)})"
            if times
            else "recovery n=0"
        )
        head = (
            f"jobs {self.enqueued_ok}, executions {self.executions}, completed"
            f" {self.completed}, kills {self.kills},"
            + (f" broker faults {self.broker_faults}," if self.broker_faults else "")
            + f" duplicates {self.duplicates}"
            f" ({len(self.duplicated)} jobs), lost {len(self.lost)}, unexpected"
            f" {len(self.unexpected)}, stuck {len(self.stuck)}, unexplained duplicates"
            f" {len(self.unexplained_duplicates)}, cut short {self.interrupted} (unexplained"
            f" {len(self.unexplained_interruptions)}), recovered {len(self.recovered)},"
            + (f" explained by a give-up {len(self.given_up)}," if self.given_up else "")
            + (f" quarantined {len(self.quarantined)}," if self.quarantined else "")
            + f" {recovery}"
        )
        details = [
            f"  {name}: {_sample(value)}"
            for name, value in (
                ("lost", self.lost),
                ("quarantined", self.quarantined),
                ("unexpected", self.unexpected),
                ("stuck", self.stuck),
                ("unexplained_duplicates", self.unexplained_duplicates),
                ("unexplained_interruptions", self.unexplained_interruptions),
            )
            if value
        ]
        return "\n".join([head, *details])


def _sample(value: list[str] | dict[str, str]) -> str:
    items = [f"{k}={v}" for k, v in value.items()] if isinstance(value, dict) else list(value)
    more = f" ... ({len(items)} in all)" if len(items) > 10 else ""
    return ", ".join(items[:10]) + more


def check(
    records: Records,
    states: Mapping[str, str],
    given_up: Collection[str] = (),
    quarantined: Collection[str] = (),
) -> CheckResult:
    """Check ``records`` against ``states`` (job id -> the broker's final state name, for every
    job the broker still has). ``given_up``: jobs their worker gave up itself; ``quarantined``:
    jobs failed by the crash-poison rule (see above)."""
    outcomes: dict[str, set[Outcome]] = defaultdict(set)
    for enqueue in records.enqueues:
        outcomes[enqueue.job_id].add(enqueue.outcome)
    runs: dict[str, list[Execution]] = defaultdict(list)
    for execution in records.executions:
        runs[execution.job_id].append(execution)
    for job_runs in runs.values():
        job_runs.sort(key=lambda e: e.t_start)
    kills = [f for f in records.faults if f.kind == KILL]
    broker_faults = [f for f in records.faults if f.kind in BROKER_FAULTS]
    stored = {Outcome.OK, Outcome.EXISTING}
    acknowledged = sorted(j for j, o in outcomes.items() if o & stored)
    completed = {j: [e for e in rs if e.t_end is not None] for j, rs in runs.items()}

    result = CheckResult(
        enqueued_ok=len(acknowledged),
        executions=len(records.executions),
        completed=sum(len(c) for c in completed.values()),
        kills=len(kills),
        broker_faults=len(broker_faults),
    )
    poisoned = {
        j
        for j in quarantined
        if states.get(j) == "failed"
        and any(e.t_end is None and _killed(e, kills, until=float("inf")) for e in runs[j])
    }
    never = [j for j in acknowledged if not completed.get(j)]
    result.lost = [j for j in never if j not in poisoned]
    result.quarantined = [j for j in never if j in poisoned]
    result.unexpected = sorted(j for j in runs if not outcomes[j] & {*stored, Outcome.UNKNOWN})
    result.duplicated = {j: len(c) for j, c in sorted(completed.items()) if len(c) > 1}
    result.recovered = sorted(
        j
        for j, o in outcomes.items()
        if Outcome.UNKNOWN in o
        and (Outcome.EXISTING in o or (o == {Outcome.UNKNOWN} and (j in states or j in runs)))
    )
    result.stuck = {j: s for j, s in sorted(states.items()) if s not in TERMINAL_STATES}
    by_faults = [
        j for j in result.duplicated if not _explained(completed[j], runs[j], kills, broker_faults)
    ]
    cut_short = [e for e in records.executions if e.t_end is None]
    result.interrupted = len(cut_short)
    not_killed = {e.job_id for e in cut_short if not _killed(e, kills, until=float("inf"))}
    gave_up = set(given_up)
    result.unexplained_duplicates = [j for j in by_faults if j not in gave_up]
    result.unexplained_interruptions = sorted(not_killed - gave_up)
    result.given_up = sorted(gave_up & {*by_faults, *not_killed})
    result.recovery_times = _recovery_times(runs, kills)
    return result


def _killed(execution: Execution, kills: list[Fault], until: float) -> bool:
    return any(k.pid == execution.pid and execution.t_start <= k.t <= until for k in kills)


def _broker_fault(execution: Execution, faults: list[Fault], until: float) -> bool:
    """A broker fault lasting into [the execution's start, ``until``]."""
    return any(
        f.t <= until and execution.t_start <= (f.t if f.t_end is None else f.t_end) for f in faults
    )


def _explained(
    done: list[Execution], every: list[Execution], kills: list[Fault], broker: list[Fault]
) -> bool:
    """Every completed execution but the last was killed, or met a broker fault, before the
    job's next start."""
    for execution in done[:-1]:
        later = [e.t_start for e in every if e.t_start > execution.t_start]
        if not later or not (
            _killed(execution, kills, until=later[0])
            or _broker_fault(execution, broker, until=later[0])
        ):
            return False
    return True


def _recovery_times(runs: Mapping[str, list[Execution]], kills: list[Fault]) -> list[float]:
    """Kill -> the job's next start, for each execution a kill of its process ended or
    orphaned (cut short, or completed but not acknowledged: its duplicate)."""
    times = []
    for job_runs in runs.values():
        for execution, following in itertools.pairwise(job_runs):
            after = [
                k.t
                for k in kills
                if k.pid == execution.pid and execution.t_start <= k.t <= following.t_start
            ]
            if after:
                times.append(following.t_start - min(after))
    return times
