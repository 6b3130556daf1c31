"""The ``make demo`` workload: a shop's background jobs on SQLite, run by two worker processes."""
