"""The fault harness (docs/reliability.md): a ledger of enqueues, executions and faults kept
apart from the broker under test, a checker that reads it against the broker's final states,
and fault schedules drawn from a seed."""
