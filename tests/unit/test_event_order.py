"""The per-job reordering of events (``events._Reorder``) that ``app.events()`` applies: each job's
events in ``seq`` order, an event whose predecessor is missing held for up to ``hold_s``, other
jobs never held up. Time is a number the test passes in; nothing waits."""

from __future__ import annotations

from taskmill.events import Event, _Reorder

HOLD_S = 0.2


def event(seq: int, job_id: str = "a", state: str = "", progress: float | None = None) -> Event:
    default = "queued" if seq == 0 else "running" if seq % 2 else "scheduled"
    return Event(job_id, "t", "default", state or default, (seq + 1) // 2, 0.0, seq, progress)


def seqs(events: list[Event]) -> list[tuple[str, int]]:
    return [(e.job_id, e.seq) for e in events]


def expire_all(reorder: _Reorder, now: float) -> list[Event]:
    """What ``subscribe`` releases at ``now``: it calls ``expired`` again while a deadline has
    passed (its wait for the next payload times out at once)."""
    out: list[Event] = []
    while (deadline := reorder.next_deadline()) is not None and deadline <= now:
        released = reorder.expired(now)
        assert released, "a passed deadline must release something"
        out += released
    return out


def test_events_in_order_pass_at_once() -> None:
    reorder = _Reorder(HOLD_S)
    for seq in range(4):
        assert seqs(reorder.push(event(seq), now=0.0)) == [("a", seq)]
    assert reorder.next_deadline() is None


def test_an_event_before_its_predecessor_waits_for_it() -> None:
    reorder = _Reorder(HOLD_S)
    assert reorder.push(event(1), now=0.0) == []  # the worker's `running` came first
    assert reorder.next_deadline() == HOLD_S
    assert seqs(reorder.push(event(0), now=0.05)) == [("a", 0), ("a", 1)]
    assert reorder.next_deadline() is None
    assert reorder.expired(1.0) == []


def test_several_held_events_go_in_seq_order_once_the_gap_fills() -> None:
    reorder = _Reorder(HOLD_S)
    assert seqs(reorder.push(event(0), now=0.0)) == [("a", 0)]
    for seq in (4, 2, 3):
        assert reorder.push(event(seq), now=0.01) == []
    assert seqs(reorder.push(event(1), now=0.02)) == [("a", s) for s in (1, 2, 3, 4)]
    assert reorder.next_deadline() is None


def test_a_missing_predecessor_is_given_up_after_hold_s() -> None:
    reorder = _Reorder(HOLD_S)
    assert reorder.push(event(1), now=0.0) == []  # seq 0 was published before we listened
    assert reorder.expired(HOLD_S - 0.001) == []
    assert seqs(reorder.expired(HOLD_S)) == [("a", 1)]
    assert reorder.next_deadline() is None
    # and the job goes on from there, in order, without holding
    assert seqs(reorder.push(event(2), now=0.3)) == [("a", 2)]


def test_a_gap_in_the_middle_releases_what_follows_it_in_order() -> None:
    reorder = _Reorder(HOLD_S)
    reorder.push(event(0), now=0.0)
    for seq in (5, 3, 4):  # 1 and 2 were lost
        assert reorder.push(event(seq), now=0.1) == []
    assert reorder.expired(0.2) == []
    assert seqs(expire_all(reorder, now=0.1 + HOLD_S)) == [("a", 3), ("a", 4), ("a", 5)]
    assert reorder.next_deadline() is None


def test_held_events_with_two_gaps_all_leave_once_their_deadlines_pass() -> None:
    reorder = _Reorder(HOLD_S)
    reorder.push(event(0), now=0.0)
    for seq in (2, 3, 6):  # 1, 4 and 5 lost
        reorder.push(event(seq), now=0.0)
    assert seqs(expire_all(reorder, now=HOLD_S)) == [("a", 2), ("a", 3), ("a", 6)]


def test_the_deadline_is_the_first_held_events_arrival_plus_hold_s() -> None:
    reorder = _Reorder(HOLD_S)
    reorder.push(event(2), now=1.0)
    reorder.push(event(3), now=1.15)
    reorder.push(event(2, job_id="b"), now=1.1)
    assert reorder.next_deadline() == 1.0 + HOLD_S
    assert seqs(reorder.expired(1.0 + HOLD_S)) == [("a", 2), ("a", 3)]
    assert reorder.next_deadline() == 1.1 + HOLD_S


def test_one_jobs_gap_does_not_hold_another_job() -> None:
    reorder = _Reorder(HOLD_S)
    assert reorder.push(event(1, job_id="a"), now=0.0) == []
    assert seqs(reorder.push(event(0, job_id="b"), now=0.0)) == [("b", 0)]
    assert seqs(reorder.push(event(1, job_id="b"), now=0.0)) == [("b", 1)]
    assert seqs(reorder.push(event(0, job_id="a"), now=0.0)) == [("a", 0), ("a", 1)]


def test_progress_repeats_its_runs_seq_and_passes_at_once() -> None:
    reorder = _Reorder(HOLD_S)
    reorder.push(event(0), now=0.0)
    reorder.push(event(1), now=0.0)
    for fraction in (0.25, 0.5):
        released = reorder.push(event(1, progress=fraction), now=0.0)
        assert [e.progress for e in released] == [fraction]


def test_a_late_event_older_than_the_last_one_is_passed_on_not_held() -> None:
    """``watch`` drops what its snapshot already told; the reordering itself loses nothing."""
    reorder = _Reorder(HOLD_S)
    for seq in (0, 1, 2):
        reorder.push(event(seq), now=0.0)
    assert seqs(reorder.push(event(1, state="running"), now=0.0)) == [("a", 1)]
    assert seqs(reorder.push(event(3), now=0.0)) == [("a", 3)]  # the order goes on from 2


def test_a_retried_jobs_second_attempt_follows_its_first() -> None:
    reorder = _Reorder(HOLD_S)
    # attempt 1 runs (1) and is scheduled for a retry (2); attempt 2 runs (3) and succeeds (4);
    # the second worker's events arrive before the first worker's outcome
    reorder.push(event(0), now=0.0)
    reorder.push(event(1), now=0.0)
    assert reorder.push(event(3), now=0.0) == []
    assert reorder.push(event(4, state="succeeded"), now=0.0) == []
    released = reorder.push(event(2, state="scheduled"), now=0.01)
    assert [(e.seq, e.state) for e in released] == [
        (2, "scheduled"),
        (3, "running"),
        (4, "succeeded"),
    ]


def test_a_long_subscription_remembers_a_bounded_number_of_ended_jobs() -> None:
    """A dashboard's stream lives for weeks: the reordering kept one entry per job it ever
    saw. Jobs that ended are forgotten past ``keep_ended``, oldest first; running ones stay."""
    reorder = _Reorder(HOLD_S, keep_ended=3)
    assert seqs(reorder.push(event(0, "running-job"), 0.0)) == [("running-job", 0)]
    for n in range(10):
        job = f"job-{n}"
        for seq, state in [(0, "queued"), (1, "running"), (2, "succeeded")]:
            assert seqs(reorder.push(event(seq, job, state), 0.0)) == [(job, seq)]
    assert sorted(reorder.last) == ["job-7", "job-8", "job-9", "running-job"]
    # a job forgotten and then retried by hand: its next event waits like one whose
    # predecessor was lost, then goes (never dropped)
    retried = event(3, "job-0", "queued")
    assert reorder.push(retried, 0.0) == []
    assert seqs(expire_all(reorder, 1.0)) == [("job-0", 3)]
