"""The checker on hand-made ledgers: each figure counted as docs/reliability.md says."""

from __future__ import annotations

import itertools
from pathlib import Path

from faults.checker import BROKER_KILL, CONNECTION_KILL, DROP_REPLIES, check
from faults.ledger import Enqueue, Execution, Fault, Ledger, Outcome, Records
from faults.schedule import kill_schedule


def ok(*job_ids: str) -> list[Enqueue]:
    return [Enqueue(j, 0.0, Outcome.OK) for j in job_ids]


def run(job_id: str, t_start: float, t_end: float | None, pid: int = 100) -> Execution:
    return Execution(job_id, 1, f"{pid}-x", pid, t_start, t_end)


def kill(t: float, pid: int = 100) -> Fault:
    return Fault(t, "kill -9", pid, "worker child")


def test_a_clean_run_is_ok() -> None:
    records = Records(ok("a", "b"), [run("a", 1, 2), run("b", 1, 3)], [])
    result = check(records, {"a": "succeeded", "b": "succeeded"})
    assert result.ok and result.enqueued_ok == 2 and result.completed == 2
    assert result.summary().startswith("jobs 2, executions 2, completed 2, kills 0")


def test_an_acknowledged_job_never_completed_is_lost() -> None:
    records = Records(ok("a", "b", "c"), [run("a", 1, 2), run("b", 1, None)], [kill(1.5)])
    result = check(records, {"a": "succeeded", "b": "succeeded"})
    assert result.lost == ["b", "c"] and not result.ok
    assert "lost: b, c" in result.summary()


def test_a_job_that_ran_without_an_ok_or_unknown_enqueue_is_unexpected() -> None:
    enqueues = [*ok("a"), Enqueue("e", 0.0, Outcome.ERROR, "refused")]
    records = Records(enqueues, [run("a", 1, 2), run("e", 1, 2), run("ghost", 1, 2)], [])
    assert check(records, {}).unexpected == ["e", "ghost"]


def test_unknown_outcomes_that_committed_are_recovered_and_the_others_are_not_lost() -> None:
    enqueues = [Enqueue(j, 0.0, Outcome.UNKNOWN) for j in ("ran", "stored", "gone")]
    records = Records(enqueues, [run("ran", 1, 2)], [])
    result = check(records, {"stored": "succeeded"})
    assert result.recovered == ["ran", "stored"] and result.ok


def test_non_terminal_jobs_after_the_drain_are_stuck() -> None:
    records = Records(ok("a", "b"), [run("a", 1, 2), run("b", 1, 2)], [])
    result = check(records, {"a": "running", "b": "failed", "c": "queued"})
    assert result.stuck == {"a": "running", "c": "queued"} and not result.ok


def test_a_duplicate_whose_first_process_was_killed_after_it_started_is_explained() -> None:
    runs = [run("a", 1, 2, pid=100), run("a", 5, 6, pid=200)]
    result = check(Records(ok("a"), runs, [kill(2.5, pid=100)]), {"a": "succeeded"})
    assert result.duplicated == {"a": 2} and result.duplicates == 1
    assert result.unexplained_duplicates == [] and result.ok
    assert result.recovery_times == [2.5]  # from the kill to the second run


def test_a_duplicate_without_a_kill_of_the_earlier_process_is_unexplained() -> None:
    runs = [run("a", 1, 2, pid=100), run("a", 5, 6, pid=200)]
    for faults in ([], [kill(2.5, pid=300)], [kill(0.5)], [kill(5.5)]):  # no kill, other pid,
        result = check(Records(ok("a"), runs, faults), {})  # before the run, after the rerun
        assert result.unexplained_duplicates == ["a"] and not result.ok, faults


def test_a_job_its_worker_gave_up_explains_its_duplicate_and_its_cut_short_run() -> None:
    runs = [
        run("a", 1, 2, pid=100),  # given up, its body ended anyway
        run("a", 5, 6, pid=200),
        run("b", 1, None, pid=100),  # given up, then cut short (its thread stopped)
        run("b", 4, 5, pid=200),
        run("c", 1, 2, pid=100),  # a duplicate nothing explains
        run("c", 5, 6, pid=200),
    ]
    records = Records(ok("a", "b", "c"), runs, [])
    plain = check(records, {})
    assert plain.unexplained_duplicates == ["a", "c"] and plain.unexplained_interruptions == ["b"]
    result = check(records, {}, given_up={"a", "b", "elsewhere"})
    assert result.unexplained_duplicates == ["c"] and result.unexplained_interruptions == []
    assert result.given_up == ["a", "b"] and not result.ok  # "elsewhere" explained nothing
    assert "explained by a give-up 2," in result.summary()
    assert "give-up" not in plain.summary()


def test_a_job_the_crash_poison_rule_failed_after_a_kill_is_quarantined_not_lost() -> None:
    """A job running at three kills of a crash storm is failed by the broker's lost-lease
    rule (T10's quarantine): named by the caller, it is listed as quarantined when the ledger
    shows a kill of a process running it; without such a kill, or still running, it is lost."""
    runs = [run("a", 1, None, pid=100), run("b", 1, None, pid=200), run("d", 1, 2, pid=100)]
    records = Records(ok("a", "b", "c", "d"), runs, [kill(1.5, pid=100)])
    states = {"a": "failed", "b": "failed", "c": "failed", "d": "succeeded"}
    plain = check(records, states)
    assert plain.lost == ["a", "b", "c"] and plain.quarantined == []
    result = check(records, states, quarantined={"a", "b", "c", "d"})
    assert result.quarantined == ["a"]  # b: its process was not killed; c: it never ran
    assert result.lost == ["b", "c"] and not result.ok
    assert "quarantined 1," in result.summary() and "quarantined" not in plain.summary()
    alone = check(Records(ok("a"), runs[:1], [kill(1.5, pid=100)]), {"a": "failed"}, [], {"a"})
    assert alone.ok and alone.lost == [] and alone.quarantined == ["a"]
    running = check(Records(ok("a"), runs[:1], [kill(1.5)]), {"a": "queued"}, [], {"a"})
    assert running.lost == ["a"]  # not failed: the rule did not fail it


def broker_fault(kind: str, t: float, t_end: float | None = None) -> Fault:
    return Fault(t, kind, 0, "broker", t_end)


def test_a_broker_fault_during_the_earlier_run_explains_a_duplicate_on_any_pid() -> None:
    runs = [run("a", 1, 2, pid=100), run("a", 5, 6, pid=200)]
    for fault in (
        broker_fault(BROKER_KILL, 1.5, 3.0),  # killed during the run, back after it
        broker_fault(BROKER_KILL, 0.5, 1.2),  # down at its start, back during it
        broker_fault(CONNECTION_KILL, 2.5),  # its acknowledgement's connection killed
        broker_fault(DROP_REPLIES, 4.0, 4.5),  # replies dropped before the rerun
    ):
        result = check(Records(ok("a"), runs, [fault]), {"a": "succeeded"})
        assert result.unexplained_duplicates == [] and result.ok, fault
        assert result.broker_faults == 1 and result.kills == 0
        assert "kills 0, broker faults 1, duplicates 1" in result.summary()


def test_a_broker_fault_outside_the_span_explains_no_duplicate() -> None:
    runs = [run("a", 1, 2, pid=100), run("a", 5, 6, pid=200)]
    for fault in (
        broker_fault(BROKER_KILL, 0.2, 0.8),  # over before the first run began
        broker_fault(CONNECTION_KILL, 0.5),
        broker_fault(DROP_REPLIES, 5.5, 7.0),  # began after the rerun started
        Fault(2.5, "pause", 0, "broker"),  # not a broker fault the checker knows
    ):
        result = check(Records(ok("a"), runs, [fault]), {})
        assert result.unexplained_duplicates == ["a"] and not result.ok, fault


def test_a_broker_fault_explains_no_execution_cut_short() -> None:
    runs = [run("a", 1, None, pid=100), run("a", 4.5, 5, pid=200)]
    result = check(Records(ok("a"), runs, [broker_fault(BROKER_KILL, 2.0, 3.0)]), {})
    assert result.unexplained_interruptions == ["a"] and result.recovery_times == []


def test_a_resend_that_finds_the_job_stored_recovers_the_unknown_attempt() -> None:
    enqueues = [
        Enqueue("committed", 0.0, Outcome.UNKNOWN),
        Enqueue("committed", 1.0, Outcome.EXISTING),
        Enqueue("resent", 0.0, Outcome.UNKNOWN),
        Enqueue("resent", 1.0, Outcome.OK),
        Enqueue("plain", 0.0, Outcome.EXISTING),  # not a resend of an unknown: no recovery
    ]
    runs = [run("committed", 2, 3), run("resent", 2, 3), run("plain", 2, 3)]
    result = check(Records(enqueues, runs, []), {})
    assert result.recovered == ["committed"] and result.ok
    assert result.enqueued_ok == 3 and result.unexpected == []
    lost = check(Records(enqueues, runs[1:], []), {})
    assert lost.lost == ["committed"]  # acknowledged by the resend, so it must run


def test_an_execution_cut_short_is_no_duplicate_and_gives_a_recovery_time() -> None:
    runs = [run("a", 1, None, pid=100), run("a", 4.5, 5, pid=200), run("b", 1, 1.5)]
    result = check(Records(ok("a", "b"), runs, [kill(2.0)]), {})
    assert result.ok and result.duplicated == {} and result.executions == 3
    assert result.recovery_times == [2.5] and result.interrupted == 1
    assert "cut short 1 (unexplained 0)" in result.summary()
    assert "recovery median 2.50 s max 2.50 s (n=1)" in result.summary()


def test_an_execution_cut_short_without_a_kill_of_its_process_is_unexplained() -> None:
    runs = [run("a", 3, None, pid=100), run("a", 4.5, 5, pid=200), run("b", 1, None, pid=300)]
    result = check(Records(ok("a", "b"), runs, [kill(2.0, pid=100), kill(1.5, pid=300)]), {})
    assert result.unexplained_interruptions == ["a"] and not result.ok  # killed before it ran
    assert result.lost == ["b"]


def test_the_ledger_file_reads_back_what_was_written(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    ledger.record_enqueues([Enqueue("a", 1.0, Outcome.OK)])
    ledger.record_enqueue("b", Outcome.UNKNOWN, "timed out", t=2.0)
    seq = ledger.start_execution("a", 1)
    ledger.end_execution(seq)
    ledger.start_execution("a", 2)
    ledger.record_fault("kill -9", 42, "worker child", t=3.0)
    ledger.record_fault(BROKER_KILL, 7, "broker", t=4.0, t_end=5.5)
    records = Ledger(tmp_path / "ledger.db").read()
    assert records.enqueues == [
        Enqueue("a", 1.0, Outcome.OK),
        Enqueue("b", 2.0, Outcome.UNKNOWN, "timed out"),
    ]
    assert [(e.job_id, e.attempt, e.t_end is None) for e in records.executions] == [
        ("a", 1, False),
        ("a", 2, True),
    ]
    assert records.faults == [
        Fault(3.0, "kill -9", 42, "worker child"),
        Fault(4.0, BROKER_KILL, 7, "broker", 5.5),
    ]


def test_a_seed_gives_the_same_schedule() -> None:
    first = kill_schedule(7, 8, every_s=2.0)
    assert first == kill_schedule(7, 8, every_s=2.0) != kill_schedule(8, 8, every_s=2.0)
    gaps = [b.at_s - a.at_s for a, b in itertools.pairwise(first)]
    assert len(first) == 8 and all(1.5 <= g <= 2.5 for g in gaps)
