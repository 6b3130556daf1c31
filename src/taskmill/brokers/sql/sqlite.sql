-- Named queries of the SQLite broker, loaded once by taskmill.brokers.sqlite.
-- Each query starts with a "-- name: NAME" line. Times are seconds since the epoch (REAL).

-- name: schema_v1
CREATE TABLE IF NOT EXISTS taskmill_jobs (
    seq              INTEGER PRIMARY KEY,
    id               TEXT    NOT NULL UNIQUE,
    task             TEXT    NOT NULL,
    queue            TEXT    NOT NULL,
    state            TEXT    NOT NULL,
    payload          BLOB    NOT NULL,
    priority         INTEGER NOT NULL DEFAULT 0,
    attempt          INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL DEFAULT 1,
    run_at           REAL    NOT NULL,
    enqueued_at      REAL    NOT NULL,
    started_at       REAL,
    finished_at      REAL,
    timeout_s        REAL,
    key              TEXT,
    lease_token      TEXT,
    lease_expires_at REAL,
    worker_id        TEXT,
    lost_leases      INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    result           BLOB,
    error            TEXT,
    progress         REAL,
    progress_message TEXT
);
-- Claim walks this index in order: O(log n) to find the next job of a queue. Every index is
-- partial except the id's: an insert touches three b-trees, not five (a (state, queue) index
-- cost a third of bulk-enqueue speed, and `stats` scans the table instead: fine for the CLI).
CREATE INDEX IF NOT EXISTS taskmill_jobs_ready
    ON taskmill_jobs (queue, priority DESC, run_at, seq) WHERE state = 'queued';
CREATE INDEX IF NOT EXISTS taskmill_jobs_scheduled
    ON taskmill_jobs (run_at) WHERE state = 'scheduled';
CREATE INDEX IF NOT EXISTS taskmill_jobs_leases
    ON taskmill_jobs (lease_expires_at) WHERE state = 'running';
CREATE INDEX IF NOT EXISTS taskmill_jobs_finished
    ON taskmill_jobs (finished_at) WHERE state IN ('succeeded', 'failed', 'cancelled');
CREATE UNIQUE INDEX IF NOT EXISTS taskmill_jobs_pending_key
    ON taskmill_jobs (key) WHERE key IS NOT NULL AND state IN ('scheduled', 'queued', 'running');
CREATE TABLE IF NOT EXISTS taskmill_queues (
    name   TEXT PRIMARY KEY,
    paused INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS taskmill_schedules (
    name      TEXT PRIMARY KEY,
    last_tick REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS taskmill_workflows (
    id          TEXT PRIMARY KEY,
    spec        BLOB NOT NULL,
    state       TEXT NOT NULL,
    created_at  REAL NOT NULL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS taskmill_workflows_running
    ON taskmill_workflows (created_at) WHERE state = 'running';
CREATE TABLE IF NOT EXISTS taskmill_rate_limits (
    bucket TEXT PRIMARY KEY,
    tat    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS taskmill_slots (
    bucket     TEXT NOT NULL,
    holder     TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (bucket, holder)
);
CREATE TABLE IF NOT EXISTS taskmill_events (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    payload BLOB NOT NULL,
    at      REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS taskmill_workers (
    id           TEXT PRIMARY KEY,
    host         TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    queues       TEXT NOT NULL,
    concurrency  INTEGER NOT NULL,
    started_at   REAL NOT NULL,
    heartbeat_at REAL NOT NULL,
    running      TEXT NOT NULL
);

-- name: schema_v5
-- Job metadata (JSON, NULL for none); how many jobs each worker ran, and how many raised.
ALTER TABLE taskmill_jobs ADD COLUMN meta TEXT;
ALTER TABLE taskmill_workers ADD COLUMN processed INTEGER NOT NULL DEFAULT 0;
ALTER TABLE taskmill_workers ADD COLUMN failed INTEGER NOT NULL DEFAULT 0;

-- name: schema_v6
-- Counts of jobs per queue in the states no index counts cheaply: scheduled and the three
-- finished states, which a system keeps millions of (stats and listing totals read this table,
-- not the jobs). Triggers keep it, so every write of every process counts; a send of a due
-- job and a claim touch no count (queued and running jobs are counted on their own partial
-- indexes), a finish moves one job into one. Not an upsert: an outer INSERT OR IGNORE (a send)
-- imposes its conflict policy on a trigger's statements, which would drop the upsert's update.
CREATE TABLE IF NOT EXISTS taskmill_counts (
    queue TEXT    NOT NULL,
    state TEXT    NOT NULL,
    n     INTEGER NOT NULL,
    PRIMARY KEY (queue, state)
) WITHOUT ROWID;
INSERT INTO taskmill_counts (queue, state, n)
SELECT queue, state, count(*) FROM taskmill_jobs
WHERE state IN ('scheduled', 'succeeded', 'failed', 'cancelled')
GROUP BY queue, state;
CREATE TRIGGER IF NOT EXISTS taskmill_counts_insert AFTER INSERT ON taskmill_jobs
WHEN new.state NOT IN ('queued', 'running')
BEGIN
    INSERT OR IGNORE INTO taskmill_counts (queue, state, n) VALUES (new.queue, new.state, 0);
    UPDATE taskmill_counts SET n = n + 1 WHERE queue = new.queue AND state = new.state;
END;
CREATE TRIGGER IF NOT EXISTS taskmill_counts_delete AFTER DELETE ON taskmill_jobs
WHEN old.state NOT IN ('queued', 'running')
BEGIN
    UPDATE taskmill_counts SET n = n - 1 WHERE queue = old.queue AND state = old.state;
END;
CREATE TRIGGER IF NOT EXISTS taskmill_counts_update AFTER UPDATE OF state ON taskmill_jobs
WHEN old.state <> new.state
    AND (old.state NOT IN ('queued', 'running') OR new.state NOT IN ('queued', 'running'))
BEGIN
    UPDATE taskmill_counts SET n = n - 1
    WHERE queue = old.queue AND state = old.state AND old.state NOT IN ('queued', 'running');
    INSERT OR IGNORE INTO taskmill_counts (queue, state, n)
    SELECT new.queue, new.state, 0 WHERE new.state NOT IN ('queued', 'running');
    UPDATE taskmill_counts SET n = n + 1
    WHERE queue = new.queue AND state = new.state AND new.state NOT IN ('queued', 'running');
END;

-- name: schema_v7
-- A long payload in a table of its own, written once: SQLite writes a row whole at every
-- update (a claim, a progress report, a finish), so a job's 250 KB payload was written to
-- the log three times or more, 2 ms a job (docs/reliability.md, T9). Its job's row keeps an
-- empty payload (no send stores one: the shortest is "[[],{}]"); the row's delete takes it.
CREATE TABLE IF NOT EXISTS taskmill_payloads (
    seq     INTEGER PRIMARY KEY,
    payload BLOB NOT NULL
);
CREATE TRIGGER IF NOT EXISTS taskmill_payloads_delete AFTER DELETE ON taskmill_jobs
WHEN old.payload = x''
BEGIN
    DELETE FROM taskmill_payloads WHERE seq = old.seq;
END;

-- name: insert
-- OR IGNORE: a job whose id is stored already is the same job (a retried send, a periodic
-- tick two schedulers saw), and a keyed job whose key a pending job holds is not stored.
INSERT OR IGNORE INTO taskmill_jobs
    (id, task, queue, state, payload, priority, max_attempts, run_at, enqueued_at, timeout_s,
     meta, key)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?);

-- name: insert_payload
-- After the job's row (its payload empty), in the same transaction; a job stored before
-- keeps its own payload.
INSERT OR IGNORE INTO taskmill_payloads (seq, payload)
SELECT seq, ? FROM taskmill_jobs WHERE id = ? AND payload = x'';

-- name: job_exists
SELECT 1 FROM taskmill_jobs WHERE id = ?;

-- name: stored_enqueued_at
SELECT enqueued_at FROM taskmill_jobs WHERE id = ?;

-- name: pending_by_key
SELECT id FROM taskmill_jobs
WHERE key = ? AND state IN ('scheduled', 'queued', 'running');

-- name: promote_due
UPDATE taskmill_jobs SET state = 'queued' WHERE state = 'scheduled' AND run_at <= ?;

-- name: paused_queues
SELECT name FROM taskmill_queues WHERE paused = 1;

-- name: candidates
SELECT seq, priority, run_at FROM taskmill_jobs
WHERE state = 'queued' AND queue = ?
ORDER BY priority DESC, run_at, seq LIMIT ?;

-- name: claim
UPDATE taskmill_jobs
SET state = 'running', attempt = attempt + 1, lease_token = ?, lease_expires_at = ?,
    worker_id = ?, started_at = ?, cancel_requested = 0
WHERE seq IN ({candidates})
RETURNING {columns};

-- name: extend_lease
UPDATE taskmill_jobs SET lease_expires_at = ?
WHERE id = ? AND lease_token = ? AND state = 'running';

-- name: held_leases
SELECT id, lease_token, state, cancel_requested FROM taskmill_jobs WHERE id IN ({ids});

-- name: upsert_worker
INSERT INTO taskmill_workers
    (id, host, pid, queues, concurrency, started_at, heartbeat_at, running, processed, failed)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at, running = excluded.running,
    processed = excluded.processed, failed = excluded.failed;

-- name: delete_worker
DELETE FROM taskmill_workers WHERE id = ?;

-- name: prune_workers
DELETE FROM taskmill_workers WHERE heartbeat_at < ?;

-- name: finish_succeeded
UPDATE taskmill_jobs
SET state = 'succeeded', result = ?, finished_at = ?, lease_token = NULL, lease_expires_at = NULL
WHERE id = ? AND lease_token = ? AND state = 'running';

-- name: finish_failed
UPDATE taskmill_jobs
SET state = 'failed', error = ?, finished_at = ?, lease_token = NULL, lease_expires_at = NULL
WHERE id = ? AND lease_token = ? AND state = 'running';

-- name: finish_cancelled
UPDATE taskmill_jobs
SET state = 'cancelled', finished_at = ?, lease_token = NULL, lease_expires_at = NULL
WHERE id = ? AND lease_token = ? AND state = 'running';

-- name: finish_retry
UPDATE taskmill_jobs
SET state = CASE WHEN ? <= ? THEN 'queued' ELSE 'scheduled' END, run_at = ?, error = ?,
    lease_token = NULL, lease_expires_at = NULL, worker_id = NULL
WHERE id = ? AND lease_token = ? AND state = 'running';

-- name: finish_released
UPDATE taskmill_jobs
SET state = 'queued', attempt = max(attempt - 1, 0), lease_token = NULL,
    lease_expires_at = NULL, worker_id = NULL, started_at = NULL
WHERE id = ? AND lease_token = ? AND state = 'running';

-- name: progress
UPDATE taskmill_jobs SET progress = ?, progress_message = ?
WHERE id = ? AND lease_token = ? AND state = 'running';

-- name: recover
-- The error's type and message come from Python (taskmill.brokers._rows): the message is a
-- template whose {attempt}, {worker} and {lost_leases} are filled in here.
UPDATE taskmill_jobs
SET state = CASE
        WHEN cancel_requested = 1 THEN 'cancelled'
        WHEN lost_leases + 1 >= :max_lost_leases THEN 'failed'
        ELSE 'queued' END,
    finished_at = CASE WHEN cancel_requested = 1 OR lost_leases + 1 >= :max_lost_leases
                       THEN :now END,
    lost_leases = lost_leases + 1,
    error = json_object(
        'type', :error_type,
        'message', replace(replace(replace(:message,
            '{attempt}', attempt), '{lost_leases}', lost_leases + 1),
            '{worker}', coalesce(worker_id, '?')),
        'traceback', ''),
    lease_token = NULL, lease_expires_at = NULL, worker_id = NULL
WHERE state = 'running' AND lease_expires_at < :now
RETURNING id, state;

-- name: next_scheduled
SELECT min(run_at) FROM taskmill_jobs WHERE state = 'scheduled';

-- name: prune
DELETE FROM taskmill_jobs WHERE seq IN (
    SELECT seq FROM taskmill_jobs
    WHERE state IN ('succeeded', 'failed', 'cancelled') AND finished_at < ?
    LIMIT ?);

-- name: get
SELECT {columns} FROM taskmill_jobs WHERE id = ?;

-- name: get_by_key
SELECT {columns} FROM taskmill_jobs
WHERE key = ? AND state IN ('scheduled', 'queued', 'running');

-- name: get_many
-- {ids}: one ? per id (at most GET_MANY_CHUNK, within SQLite's limit on parameters)
SELECT {columns} FROM taskmill_jobs WHERE id IN ({ids});

-- name: finished_per_minute
-- On the finished jobs' index (its condition repeated, so it is used): the jobs of the last
-- minutes only. The queue placeholder: empty, or the queue_filter fragment.
SELECT CAST(finished_at / 60 AS INTEGER) AS minute, state, count(*) FROM taskmill_jobs
WHERE state IN ('succeeded', 'failed', 'cancelled') AND finished_at >= ? {queue}
GROUP BY minute, state;

-- name: queue_filter
AND queue = ?

-- name: delete_finished
DELETE FROM taskmill_jobs WHERE id = ? AND state IN ('succeeded', 'failed', 'cancelled');

-- name: stats
-- The counted states from their table, running jobs on their partial index (its condition
-- repeated, so it is used); queued jobs are counted with oldest_waiting.
SELECT queue, state, n FROM taskmill_counts WHERE n > 0
UNION ALL
SELECT queue, 'running', count(*) FROM taskmill_jobs WHERE state = 'running' GROUP BY queue;

-- name: count_counted
-- {states}: one ? per state; {queue}: empty, or the queue_filter fragment.
SELECT coalesce(sum(n), 0) FROM taskmill_counts WHERE state IN ({states}) {queue};

-- name: count_queued
SELECT count(*) FROM taskmill_jobs WHERE state = 'queued' {queue};

-- name: count_running
SELECT count(*) FROM taskmill_jobs WHERE state = 'running' {queue};

-- name: oldest_waiting
-- Per queue, on the ready index: the earliest run_at of its queued jobs, and how many.
SELECT queue, min(run_at), count(*) FROM taskmill_jobs WHERE state = 'queued' GROUP BY queue;

-- name: all_queues
SELECT name, paused FROM taskmill_queues;

-- name: workers
SELECT id, host, pid, queues, concurrency, started_at, heartbeat_at, running, processed, failed
FROM taskmill_workers ORDER BY started_at;

-- name: retry
UPDATE OR IGNORE taskmill_jobs
SET state = 'queued', attempt = 0, lost_leases = 0, run_at = ?, finished_at = NULL,
    started_at = NULL, cancel_requested = 0
WHERE id = ? AND state IN ('failed', 'cancelled')
RETURNING id;

-- name: retry_all_failed
UPDATE OR IGNORE taskmill_jobs
SET state = 'queued', attempt = 0, lost_leases = 0, run_at = ?, finished_at = NULL,
    started_at = NULL, cancel_requested = 0
WHERE state = 'failed'
RETURNING id;

-- name: cancel_waiting
UPDATE taskmill_jobs SET state = 'cancelled', finished_at = ?
WHERE id = ? AND state IN ('scheduled', 'queued');

-- name: cancel_running
UPDATE taskmill_jobs SET cancel_requested = 1 WHERE id = ? AND state = 'running';

-- name: state_of
SELECT state FROM taskmill_jobs WHERE id = ?;

-- name: run_now
UPDATE taskmill_jobs SET state = 'queued', run_at = ? WHERE id = ? AND state = 'scheduled';

-- name: purge
DELETE FROM taskmill_jobs WHERE queue = ? AND state IN ('scheduled', 'queued');

-- name: pause
INSERT INTO taskmill_queues (name, paused) VALUES (?, ?)
ON CONFLICT (name) DO UPDATE SET paused = excluded.paused;

-- name: schedule_marks
SELECT name, last_tick FROM taskmill_schedules;

-- name: mark_schedule
INSERT INTO taskmill_schedules (name, last_tick) VALUES (?, ?)
ON CONFLICT (name) DO UPDATE SET last_tick = max(last_tick, excluded.last_tick);

-- name: save_workflow
INSERT OR IGNORE INTO taskmill_workflows (id, spec, state, created_at)
VALUES (?, ?, 'running', ?);

-- name: get_workflow
SELECT id, spec, state, created_at, finished_at FROM taskmill_workflows WHERE id = ?;

-- name: end_workflow
UPDATE taskmill_workflows SET state = ?, finished_at = ? WHERE id = ? AND state = 'running';

-- name: reopen_workflow
UPDATE taskmill_workflows SET state = 'running', finished_at = NULL
WHERE id = ? AND state = 'failed';

-- name: running_workflows
SELECT id FROM taskmill_workflows WHERE state = 'running' ORDER BY created_at LIMIT ?;

-- name: prune_workflows
DELETE FROM taskmill_workflows WHERE state <> 'running' AND finished_at < ?;

-- name: rate_tat
SELECT tat FROM taskmill_rate_limits WHERE bucket = ?;

-- name: set_rate_tat
INSERT INTO taskmill_rate_limits (bucket, tat) VALUES (?, ?)
ON CONFLICT (bucket) DO UPDATE SET tat = excluded.tat;

-- name: queue_depth
SELECT count(*) FROM taskmill_jobs WHERE queue = ? AND state IN ('scheduled', 'queued');

-- name: drop_expired_slots
DELETE FROM taskmill_slots WHERE bucket = ? AND expires_at <= ?;

-- name: slot_holders
SELECT holder FROM taskmill_slots WHERE bucket = ?;

-- name: hold_slot
INSERT INTO taskmill_slots (bucket, holder, expires_at) VALUES (?, ?, ?)
ON CONFLICT (bucket, holder) DO UPDATE SET expires_at = excluded.expires_at;

-- name: release_slot
DELETE FROM taskmill_slots WHERE bucket = ? AND holder = ?;

-- name: publish_events
INSERT INTO taskmill_events (payload, at) VALUES (?, ?);

-- name: last_event
SELECT coalesce(max(seq), 0) FROM taskmill_events;

-- name: events_after
SELECT seq, payload FROM taskmill_events WHERE seq > ? ORDER BY seq LIMIT 1000;

-- name: prune_events
DELETE FROM taskmill_events WHERE at < ?;
