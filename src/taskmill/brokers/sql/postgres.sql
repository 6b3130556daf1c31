-- Named queries of the PostgreSQL broker, loaded once by taskmill.brokers.postgres.
-- Each query starts with a "-- name: NAME" line. {schema} is replaced by the schema's name,
-- {columns} by the "columns" fragment, and the other {placeholders} as each query says;
-- parameters are psycopg's %(name)s. Times are stored as timestamptz from the server's clock
-- and cross the wire as epoch seconds (date_part gives a double precision). Wake-ups are
-- pg_notify(channel, payload) with payload 'q<queue>' (work is due now) or
-- 's<seconds> <queue>' (a job comes due in that many seconds): NOTIFY is transactional, so a
-- listener hears of a job only once it is committed.

-- name: columns
j.seq, j.id, j.task, j.queue, j.state, j.payload, j.priority, j.attempt, j.max_attempts,
date_part('epoch', j.run_at), date_part('epoch', j.enqueued_at),
date_part('epoch', j.started_at), date_part('epoch', j.finished_at), j.timeout_s, j.key,
j.lease_token, date_part('epoch', j.lease_expires_at), j.worker_id, j.lost_leases,
j.cancel_requested, j.result, j.error::text, j.progress, j.progress_message, j.meta::text

-- name: schema_exists
-- The schema's name parsed as the statements below parse it (folded to lower case).
SELECT to_regnamespace(%(schema)s) IS NOT NULL;

-- name: create_schema
-- Only when it does not exist: CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even
-- then, which a role that owns its schema but may not make others does not have.
CREATE SCHEMA IF NOT EXISTS {schema};

-- name: version_table
CREATE TABLE IF NOT EXISTS {schema}.schema_version (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: migration_lock
-- One migrator per schema at a time; the lock ends with the transaction.
SELECT pg_advisory_xact_lock(%(lock_class)s, hashtext(%(schema)s));

-- name: applied_versions
SELECT version FROM {schema}.schema_version ORDER BY version;

-- name: record_version
INSERT INTO {schema}.schema_version (version, name) VALUES (%(version)s, %(name)s);

-- name: version_table_exists
-- False when the schema or its version table does not exist (to_regclass does not raise).
SELECT to_regclass(%(table)s) IS NOT NULL;

-- name: current_version
SELECT max(version) FROM {schema}.schema_version;

-- name: enqueue
-- A batch in one statement. Its rows come from the "enqueue_rows" fragment (the jobs' columns
-- as arrays) or from "enqueue_row" (one job, for send(): cheaper to send and to plan). A job
-- is queued if due at the database's clock_timestamp() (not now(): inside a caller's long
-- transaction, now() is when that transaction began), else scheduled. A job whose id is stored
-- already is the same job, and a unique key held by a pending job makes the row a no-op (DO
-- NOTHING on either; within the batch the first job with a key wins). The reply lists the
-- keyed jobs that were stored, so the caller can look up the others, how many rows were
-- stored, and, only when fewer rows than jobs were stored, the ids this statement stored (a
-- job not among them whose id is in the table was stored before: the same job; comparing
-- enqueue times instead misread two concurrent statements in the same microsecond).
WITH clock AS MATERIALIZED (SELECT clock_timestamp() AS now),
batch AS (
    SELECT b.*, clock.now,
           CASE WHEN b.run_at IS NOT NULL THEN to_timestamp(b.run_at)
                ELSE clock.now + make_interval(secs => b.delay_s) END AS due
    FROM {rows}
         AS b(id, task, queue, payload, priority, run_at, delay_s, max_attempts, timeout_s,
              key, meta, ord)
    CROSS JOIN clock
),
inserted AS (
    INSERT INTO {schema}.jobs
        (id, task, queue, state, payload, priority, max_attempts, run_at, enqueued_at,
         timeout_s, key, meta)
    SELECT id, task, queue, CASE WHEN due <= now THEN 'queued' ELSE 'scheduled' END, payload,
           priority, max_attempts, due, now, timeout_s, key, meta::jsonb
    FROM batch ORDER BY ord
    ON CONFLICT DO NOTHING
    RETURNING id, key, queue, state, run_at
),
wake AS (
    SELECT pg_notify(%(channel)s, payload) FROM (
        SELECT DISTINCT 'q' || queue AS payload FROM inserted WHERE state = 'queued'
        UNION
        SELECT 's' || date_part('epoch', min(i.run_at) - min(c.now)) || ' ' || i.queue
        FROM inserted i CROSS JOIN clock c WHERE i.state = 'scheduled' GROUP BY i.queue
    ) w
)
SELECT coalesce(array_agg(id) FILTER (WHERE key IS NOT NULL), '{}'::text[]),
       (SELECT count(*) FROM wake),
       count(*),
       CASE WHEN count(*) < %(size)s::integer THEN coalesce(array_agg(id), '{}'::text[]) END
FROM inserted;

-- name: enqueue_rows
-- The arrays are sent in binary (psycopg's b placeholders): no text escaping, no hex bytea.
unnest(%(ids)b::text[], %(tasks)b::text[], %(queues)b::text[], %(payloads)b::bytea[],
       %(priorities)b::integer[], %(run_ats)b::float8[], %(delays)b::float8[],
       %(max_attempts)b::integer[], %(timeouts)b::float8[], %(keys)b::text[],
       %(metas)b::text[])
WITH ORDINALITY

-- name: enqueue_row
(VALUES (%(id)s::text, %(task)s::text, %(queue)s::text, %(payload)s::bytea,
         %(priority)s::integer, %(run_at)s::float8, %(delay)s::float8,
         %(max_attempts)s::integer, %(timeout)s::float8, %(key)s::text, %(meta)s::text,
         1::bigint))

-- name: pending_by_key
SELECT key, id FROM {schema}.jobs
WHERE key = ANY(%(keys)s::text[]) AND state IN ('scheduled', 'queued', 'running');

-- name: stored_ids
SELECT id FROM {schema}.jobs WHERE id = ANY(%(ids)s::text[]);

-- name: promote_due
-- Due scheduled jobs become queued, earliest first, at most 10,000 per claim (a million jobs
-- coming due at once are promoted over several claims, not in one long transaction). SKIP
-- LOCKED: two workers promoting at once never wait for each other. The queues that got work
-- are notified: a worker of another queue may be the one promoting, and an idle worker that
-- looked for the next due time just after this promotion would find none.
WITH due AS MATERIALIZED (
    SELECT seq FROM {schema}.jobs
    WHERE state = 'scheduled' AND run_at <= now()
    ORDER BY run_at LIMIT 10000
    FOR UPDATE SKIP LOCKED
),
promoted AS (
    UPDATE {schema}.jobs SET state = 'queued' WHERE seq IN (SELECT seq FROM due)
    RETURNING queue
)
SELECT pg_notify(%(channel)s, 'q' || queue) FROM (SELECT DISTINCT queue FROM promoted) w;

-- name: claim
-- Up to `limit` queued jobs of the worker's non-paused queues: one ordered walk of the ready
-- index per queue (LATERAL), rows another worker holds skipped (SKIP LOCKED), then the best
-- `limit` of them taken. Leases are measured on the database's clock.
WITH picked AS MATERIALIZED (
    SELECT c.seq
    FROM (SELECT q.name FROM unnest(%(queues)s::text[]) AS q(name)
          WHERE NOT EXISTS (SELECT 1 FROM {schema}.queues p WHERE p.name = q.name AND p.paused)
         ) AS q
    CROSS JOIN LATERAL (
        SELECT seq, priority, run_at FROM {schema}.jobs
        WHERE state = 'queued' AND queue = q.name
        ORDER BY priority DESC, run_at, seq
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED
    ) AS c
    ORDER BY c.priority DESC, c.run_at, c.seq
    LIMIT %(limit)s
)
UPDATE {schema}.jobs AS j
SET state = 'running', attempt = j.attempt + 1, lease_token = %(token)s,
    lease_expires_at = now() + make_interval(secs => %(lease_s)s), worker_id = %(worker_id)s,
    started_at = now(), cancel_requested = false
WHERE j.seq IN (SELECT seq FROM picked)
RETURNING {columns};

-- name: claim_walk
-- Pages of the ready index that this session's scans of it read, and how many scans: the
-- session's statistics not yet reported to the server (they gather for up to a second), so
-- the claim just made and perhaps a few before it. Dead entries at the head of the index
-- (jobs that left the queue, until a vacuum) make it many pages a scan; see
-- taskmill.brokers.postgres.vacuum.
SELECT pg_stat_get_xact_blocks_fetched('{schema}.jobs_ready'::regclass),
       pg_stat_get_xact_numscans('{schema}.jobs_ready'::regclass);

-- name: may_vacuum
-- Only the table's owner (a member of its role, or a superuser) may vacuum it.
SELECT pg_has_role(relowner, 'USAGE') FROM pg_class WHERE oid = '{schema}.jobs'::regclass;

-- name: vacuum_pace
-- The pace migration 5 gives autovacuum on the jobs table (a manual VACUUM is unthrottled by
-- default): on a table of millions of finished jobs, the scans of its indexes are long.
SELECT set_config('vacuum_cost_limit', '2000', false), set_config('vacuum_cost_delay', '1', false);

-- name: vacuum_jobs
-- Not while another vacuum of the table runs (SKIP_LOCKED: that one does the work), and the
-- indexes always cleaned (by default a vacuum may skip them when few heap pages have dead
-- rows, but the ready index's dead entries are what claims pay for).
VACUUM (SKIP_LOCKED, INDEX_CLEANUP ON) {schema}.jobs;

-- name: oldest_snapshot
-- The transaction of this database that has held a snapshot longest (its backend_xmin): no
-- vacuum removes a row version newer than it, so the dead entries claims walk pile up. Its
-- pid, application name, state, seconds since it began and the age of its xmin in
-- transaction ids. A role without pg_read_all_stats sees only its own role's sessions here.
SELECT pid, coalesce(application_name, ''), coalesce(state, ''),
       extract(epoch FROM clock_timestamp() - xact_start)::float8, age(backend_xmin)
FROM pg_stat_activity
WHERE datname = current_database() AND backend_xmin IS NOT NULL AND xact_start IS NOT NULL
  AND pid <> pg_backend_pid()
ORDER BY xact_start
LIMIT 1;

-- name: finish
-- A batch of outcomes in one statement; each row applies only while the job is running with
-- the claim's token (fencing). kind: S succeeded, F failed, C cancelled, R retry after
-- delay_s, L released (handed back unstarted: no attempt spent). Returns the positions
-- applied; jobs that became due (or scheduled) wake idle workers at commit. The arrays are
-- sent in binary, as for enqueue_rows.
WITH done AS (
    UPDATE {schema}.jobs AS j SET
        state = CASE f.kind
            WHEN 'S' THEN 'succeeded' WHEN 'F' THEN 'failed' WHEN 'C' THEN 'cancelled'
            WHEN 'L' THEN 'queued'
            ELSE CASE WHEN f.delay_s <= 0 THEN 'queued' ELSE 'scheduled' END END,
        result = CASE WHEN f.kind = 'S' THEN f.result ELSE j.result END,
        error = CASE WHEN f.kind IN ('F', 'R') THEN f.error::jsonb ELSE j.error END,
        run_at = CASE WHEN f.kind = 'R'
            THEN now() + make_interval(secs => greatest(f.delay_s, 0)) ELSE j.run_at END,
        finished_at = CASE WHEN f.kind IN ('S', 'F', 'C') THEN now() ELSE j.finished_at END,
        attempt = CASE WHEN f.kind = 'L' THEN greatest(j.attempt - 1, 0) ELSE j.attempt END,
        started_at = CASE WHEN f.kind = 'L' THEN NULL ELSE j.started_at END,
        worker_id = CASE WHEN f.kind IN ('R', 'L') THEN NULL ELSE j.worker_id END,
        lease_token = NULL,
        lease_expires_at = NULL
    FROM unnest(%(ords)b::integer[], %(ids)b::text[], %(tokens)b::text[], %(kinds)b::text[],
                %(results)b::bytea[], %(errors)b::text[], %(delays)b::float8[])
         AS f(ord, id, token, kind, result, error, delay_s)
    WHERE j.id = f.id AND j.lease_token = f.token AND j.state = 'running'
    RETURNING f.ord, j.queue, j.state, f.delay_s
),
wake AS (
    SELECT pg_notify(%(channel)s, payload) FROM (
        SELECT DISTINCT 'q' || queue AS payload FROM done WHERE state = 'queued'
        UNION
        SELECT 's' || min(delay_s) || ' ' || queue FROM done WHERE state = 'scheduled'
        GROUP BY queue
    ) w
)
SELECT ord, (SELECT count(*) FROM wake) FROM done;

-- name: extend_leases
UPDATE {schema}.jobs AS j
SET lease_expires_at = now() + make_interval(secs => %(lease_s)s)
FROM unnest(%(ids)s::text[], %(tokens)s::text[]) AS c(id, token)
WHERE j.id = c.id AND j.lease_token = c.token AND j.state = 'running'
RETURNING j.id, j.cancel_requested;

-- name: upsert_worker
INSERT INTO {schema}.workers
    (id, host, pid, queues, concurrency, started_at, heartbeat_at, running, processed, failed)
VALUES (%(id)s, %(host)s, %(pid)s, %(queues)s::text[], %(concurrency)s,
        to_timestamp(%(started_at)s), now(), %(running)s::text[], %(processed)s, %(failed)s)
ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at, running = excluded.running,
    processed = excluded.processed, failed = excluded.failed;

-- name: delete_worker
DELETE FROM {schema}.workers WHERE id = %(id)s;

-- name: prune_workers
-- Rows of workers that vanished without signing off (killed): gone after an hour of silence.
DELETE FROM {schema}.workers WHERE heartbeat_at < now() - interval '1 hour';

-- name: progress
UPDATE {schema}.jobs AS j SET progress = p.fraction, progress_message = p.message
FROM unnest(%(ids)s::text[], %(tokens)s::text[], %(fractions)s::float8[],
            %(messages)s::text[]) AS p(id, token, fraction, message)
WHERE j.id = p.id AND j.lease_token = p.token AND j.state = 'running';

-- name: recover
-- Running jobs whose lease expired, whoever held them. Rows locked right now (a heartbeat
-- extending the lease, a finish) are skipped: they are not abandoned. The error's type and
-- message come from Python (taskmill.brokers._rows): {attempt}, {worker} and {lost_leases}
-- in the message are filled in here.
WITH expired AS MATERIALIZED (
    SELECT seq FROM {schema}.jobs
    WHERE state = 'running' AND lease_expires_at < now()
    FOR UPDATE SKIP LOCKED
),
recovered AS (
    UPDATE {schema}.jobs SET
        state = CASE WHEN cancel_requested THEN 'cancelled'
                     WHEN lost_leases + 1 >= %(max_lost_leases)s THEN 'failed'
                     ELSE 'queued' END,
        finished_at = CASE WHEN cancel_requested OR lost_leases + 1 >= %(max_lost_leases)s
                           THEN now() END,
        lost_leases = lost_leases + 1,
        error = jsonb_build_object(
            'type', %(error_type)s::text,
            'message', replace(replace(replace(%(message)s::text,
                '{attempt}', attempt::text), '{lost_leases}', (lost_leases + 1)::text),
                '{worker}', coalesce(worker_id, '?')),
            'traceback', ''),
        lease_token = NULL, lease_expires_at = NULL, worker_id = NULL
    WHERE seq IN (SELECT seq FROM expired)
    RETURNING id, state, queue
),
wake AS (
    SELECT pg_notify(%(channel)s, 'q' || queue)
    FROM (SELECT DISTINCT queue FROM recovered WHERE state = 'queued') w
)
SELECT id, state, (SELECT count(*) FROM wake) FROM recovered;

-- name: next_due
-- Seconds until the earliest scheduled job of these queues is due (negative: overdue), by the
-- database's clock, so a worker with a skewed clock still wakes on time.
SELECT date_part('epoch', min(run_at) - clock_timestamp()) FROM {schema}.jobs
WHERE state = 'scheduled' AND queue = ANY(%(queues)s::text[]);

-- name: prune
-- A batch of finished jobs, oldest first; the worker's maintenance loop calls it again later.
WITH doomed AS MATERIALIZED (
    SELECT seq FROM {schema}.jobs
    WHERE state IN ('succeeded', 'failed', 'cancelled') AND finished_at < to_timestamp(%(before)s)
    ORDER BY finished_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
DELETE FROM {schema}.jobs WHERE seq IN (SELECT seq FROM doomed);

-- name: now
SELECT date_part('epoch', clock_timestamp());

-- name: get
SELECT {columns} FROM {schema}.jobs AS j WHERE j.id = %(id)s;

-- name: get_by_key
SELECT {columns} FROM {schema}.jobs AS j
WHERE j.key = %(key)s AND j.state IN ('scheduled', 'queued', 'running');

-- name: get_many
SELECT {columns} FROM {schema}.jobs AS j WHERE j.id = ANY(%(ids)s::text[]);

-- name: find_jobs_filter
-- The filters of a listing; a filter whose parameter is NULL (or an empty array) is off. The
-- task filter is a prefix; the meta filter is jsonb containment (numbers by value).
(cardinality(%(states)s::text[]) = 0 OR j.state = ANY(%(states)s::text[]))
AND (%(queue)s::text IS NULL OR j.queue = %(queue)s::text)
AND (%(task)s::text IS NULL OR starts_with(j.task, %(task)s::text))
AND (%(meta)s::jsonb IS NULL OR j.meta @> %(meta)s::jsonb)

-- name: find_jobs_enqueued
-- Newest first: a backward walk of the primary key from the cursor (keyset: no offset).
SELECT {columns} FROM {schema}.jobs AS j
WHERE {filter} AND (%(after)s::bigint IS NULL OR j.seq < %(after)s::bigint)
ORDER BY j.seq DESC
LIMIT %(limit)s;

-- name: find_jobs_finished
-- Latest finished first, on the partial index of finished jobs (its condition is repeated so
-- the planner can use it). The cursor is the last row's exact finish time, as text.
SELECT {columns}, j.finished_at::text FROM {schema}.jobs AS j
WHERE j.state IN ('succeeded', 'failed', 'cancelled') AND {filter}
  AND (%(after_at)s::timestamptz IS NULL
       OR (j.finished_at, j.seq) < (%(after_at)s::timestamptz, %(after)s::bigint))
ORDER BY j.finished_at DESC, j.seq DESC
LIMIT %(limit)s;

-- name: count_jobs
SELECT count(*) FROM {schema}.jobs AS j WHERE {filter};

-- name: count_queued
-- A listing's total on a large table, one pending state at a time: the state's condition
-- written out lets the planner walk its partial index rather than the table.
SELECT count(*) FROM {schema}.jobs AS j WHERE j.state = 'queued' AND {filter};

-- name: count_scheduled
SELECT count(*) FROM {schema}.jobs AS j WHERE j.state = 'scheduled' AND {filter};

-- name: count_running
SELECT count(*) FROM {schema}.jobs AS j WHERE j.state = 'running' AND {filter};

-- name: estimate_finished
-- The planner's estimate of the finished jobs a filter matches (a large table: no count).
EXPLAIN (FORMAT JSON)
SELECT 1 FROM {schema}.jobs AS j
WHERE j.state IN ('succeeded', 'failed', 'cancelled') AND {filter};

-- name: table_rows
-- The jobs table's rows as the planner reckons them: rows per page at the last vacuum or
-- analyze, times the pages it has now; -1 if it was never vacuumed or analyzed.
SELECT CASE WHEN c.relpages > 0 AND c.reltuples >= 0
            THEN c.reltuples / c.relpages
                 * (pg_relation_size(c.oid) / current_setting('block_size')::float8)
            ELSE -1 END
FROM pg_class c WHERE c.oid = '{schema}.jobs'::regclass;

-- name: finished_estimates
-- The share of the table's rows each (queue, finished state) pair has in the statistics of
-- migration 6 (the most common pairs of ANALYZE's sample; a pair too rare to be sampled is
-- missing). pg_stats_ext shows them to the table's owner only: no row otherwise.
SELECT s.most_common_vals[i][array_position(s.attnames, 'queue'::name)],
       s.most_common_vals[i][array_position(s.attnames, 'state'::name)],
       s.most_common_freqs[i]
FROM pg_stats_ext AS s CROSS JOIN LATERAL generate_subscripts(s.most_common_vals, 1) AS i
WHERE s.statistics_schemaname = %(schema)s AND s.statistics_name = 'jobs_queue_state'
  AND NOT s.inherited;

-- name: finished_per_minute
-- On the partial index of finished jobs (its condition repeated): the last minutes' jobs only.
SELECT floor(date_part('epoch', finished_at) / 60)::bigint AS minute, state, count(*)
FROM {schema}.jobs
WHERE state IN ('succeeded', 'failed', 'cancelled') AND finished_at >= to_timestamp(%(since)s)
  AND (%(queue)s::text IS NULL OR queue = %(queue)s::text)
GROUP BY minute, state;

-- name: delete_finished
DELETE FROM {schema}.jobs
WHERE id = ANY(%(ids)s::text[]) AND state IN ('succeeded', 'failed', 'cancelled')
RETURNING id;

-- name: stats
-- One statement, so one snapshot: counts per queue and state, the oldest waiting job's age per
-- queue, and every queue's paused flag. Waiting and running jobs are counted on their partial
-- indexes (each state's condition written out, so the planner uses them); finished ones only
-- if %(count_finished)s (a small table: else they are estimated, finished_estimates).
WITH queued AS MATERIALIZED (  -- one walk of the ready index for the count and the age
    SELECT queue, count(*)::float8 AS n, date_part('epoch', now() - min(run_at)) AS age
    FROM {schema}.jobs WHERE state = 'queued' GROUP BY queue
)
SELECT 'count', queue, 'queued', n FROM queued
UNION ALL
SELECT 'oldest', queue, NULL, age FROM queued
UNION ALL
SELECT 'count', queue, 'scheduled', count(*)::float8 FROM {schema}.jobs
WHERE state = 'scheduled' GROUP BY queue
UNION ALL
SELECT 'count', queue, 'running', count(*)::float8 FROM {schema}.jobs
WHERE state = 'running' GROUP BY queue
UNION ALL
SELECT 'count', queue, state, count(*)::float8 FROM {schema}.jobs
WHERE %(count_finished)s AND state IN ('succeeded', 'failed', 'cancelled') GROUP BY queue, state
UNION ALL
SELECT 'paused', name, NULL, paused::integer::float8 FROM {schema}.queues;

-- name: workers
SELECT id, host, pid, queues, concurrency, date_part('epoch', started_at),
       date_part('epoch', heartbeat_at), running, processed, failed
FROM {schema}.workers ORDER BY started_at;

-- name: retry
-- Failed or cancelled jobs back to queued with a fresh attempt budget. A job whose unique key
-- another pending job holds is skipped, and of several with one key only the first goes back
-- (the key's index allows one pending job): the first named, else the oldest. The "which"
-- placeholder selects the candidates: the retry_ids or the retry_all_failed fragment.
WITH candidates AS MATERIALIZED (
    SELECT seq, key, coalesce(array_position(%(ids)s::text[], id), 0) AS pos
    FROM {schema}.jobs WHERE {which} FOR UPDATE
),
chosen AS (
    SELECT seq FROM candidates WHERE key IS NULL
    UNION ALL
    SELECT (array_agg(c.seq ORDER BY c.pos, c.seq))[1] FROM candidates c
    WHERE c.key IS NOT NULL AND NOT EXISTS (
        SELECT 1 FROM {schema}.jobs p
        WHERE p.key = c.key AND p.state IN ('scheduled', 'queued', 'running'))
    GROUP BY c.key
),
retried AS (
    UPDATE {schema}.jobs SET
        state = 'queued', attempt = 0, lost_leases = 0, run_at = now(), finished_at = NULL,
        started_at = NULL, cancel_requested = false
    WHERE seq IN (SELECT seq FROM chosen)
    RETURNING seq, id, queue
),
wake AS (
    SELECT pg_notify(%(channel)s, 'q' || queue) FROM (SELECT DISTINCT queue FROM retried) w
)
SELECT id, (SELECT count(*) FROM wake) FROM retried ORDER BY seq;

-- name: retry_ids
id = ANY(%(ids)s::text[]) AND state IN ('failed', 'cancelled')

-- name: retry_all_failed
state = 'failed'

-- name: cancel
-- Scheduled or queued: cancelled at once. Running: a cancel is requested (the worker learns of
-- it at its next heartbeat). One UPDATE, so a job claimed at this very moment is judged by its
-- state after the claim. Otherwise (finished) the state is read as it is.
WITH changed AS (
    UPDATE {schema}.jobs SET
        state = CASE WHEN state = 'running' THEN state ELSE 'cancelled' END,
        finished_at = CASE WHEN state = 'running' THEN finished_at ELSE now() END,
        cancel_requested = cancel_requested OR state = 'running'
    WHERE id = %(id)s AND state IN ('scheduled', 'queued', 'running')
    RETURNING state
)
SELECT state FROM changed
UNION ALL
SELECT state FROM {schema}.jobs WHERE id = %(id)s AND NOT EXISTS (SELECT 1 FROM changed);

-- name: run_now
-- A scheduled job becomes queued and due now; the state before is returned whatever it was.
WITH before AS MATERIALIZED (
    SELECT seq, state FROM {schema}.jobs WHERE id = %(id)s FOR UPDATE
),
moved AS (
    UPDATE {schema}.jobs AS j SET state = 'queued', run_at = now()
    FROM before b WHERE j.seq = b.seq AND b.state = 'scheduled'
    RETURNING j.queue
),
wake AS (
    SELECT pg_notify(%(channel)s, 'q' || queue) FROM moved
)
SELECT state, (SELECT count(*) FROM wake) FROM before;

-- name: purge
DELETE FROM {schema}.jobs WHERE queue = %(queue)s AND state IN ('scheduled', 'queued');

-- name: pause
WITH changed AS (
    INSERT INTO {schema}.queues (name, paused) VALUES (%(queue)s, %(paused)s)
    ON CONFLICT (name) DO UPDATE SET paused = excluded.paused
    RETURNING name, paused
)
SELECT pg_notify(%(channel)s, 'q' || name) FROM changed WHERE NOT paused;

-- name: schedule_marks
SELECT name, last_tick FROM {schema}.schedules;

-- name: mark_schedules
INSERT INTO {schema}.schedules AS s (name, last_tick)
SELECT * FROM unnest(%(names)s::text[], %(ticks)s::float8[])
ON CONFLICT (name) DO UPDATE SET last_tick = greatest(s.last_tick, excluded.last_tick);

-- name: save_workflow
INSERT INTO {schema}.workflows (id, spec, state, created_at)
VALUES (%(id)s, %(spec)s, 'running', now())
ON CONFLICT (id) DO NOTHING;

-- name: get_workflow
SELECT id, spec, state, date_part('epoch', created_at), date_part('epoch', finished_at)
FROM {schema}.workflows WHERE id = %(id)s;

-- name: end_workflow
UPDATE {schema}.workflows SET state = %(state)s, finished_at = now()
WHERE id = %(id)s AND state = 'running';

-- name: reopen_workflow
UPDATE {schema}.workflows SET state = 'running', finished_at = NULL
WHERE id = %(id)s AND state = 'failed';

-- name: running_workflows
SELECT id FROM {schema}.workflows WHERE state = 'running' ORDER BY created_at LIMIT %(limit)s;

-- name: prune_workflows
DELETE FROM {schema}.workflows
WHERE state <> 'running' AND finished_at < to_timestamp(%(before)s);

-- name: reserve_rate_slot
-- GCRA without burst: the next start is the later of the bucket's theoretical time and now;
-- the reply is how many seconds from now it is.
WITH clock AS MATERIALIZED (SELECT clock_timestamp() AS now)
INSERT INTO {schema}.rate_limits AS r (bucket, tat)
SELECT %(bucket)s, clock.now + make_interval(secs => %(interval)s) FROM clock
ON CONFLICT (bucket) DO UPDATE
    SET tat = greatest(r.tat, (SELECT now FROM clock)) + make_interval(secs => %(interval)s)
RETURNING date_part('epoch', r.tat - (SELECT now FROM clock)) - %(interval)s;

-- name: queue_depth
SELECT count(*) FROM {schema}.jobs
WHERE queue = %(queue)s AND state IN ('scheduled', 'queued');

-- name: lock_slots
-- Acquirers of one bucket queue on a transaction-scoped advisory lock (released at commit).
SELECT pg_advisory_xact_lock(%(lock_class)s::integer, hashtext(%(bucket)s));

-- name: acquire_slot
-- Expired holders go; the holder refreshes its slot, or takes one if fewer than `limit` are
-- held. Returns a row if the slot is held.
WITH gone AS (
    DELETE FROM {schema}.slots WHERE bucket = %(bucket)s AND expires_at <= clock_timestamp()
    RETURNING holder
),
held AS (
    SELECT count(*) AS n,
           bool_or(holder = %(holder)s) AS mine
    FROM {schema}.slots
    WHERE bucket = %(bucket)s AND holder NOT IN (SELECT holder FROM gone)
)
INSERT INTO {schema}.slots AS s (bucket, holder, expires_at)
SELECT %(bucket)s, %(holder)s, clock_timestamp() + make_interval(secs => %(ttl)s)
FROM held WHERE coalesce(held.mine, false) OR held.n < %(limit)s
ON CONFLICT (bucket, holder) DO UPDATE SET expires_at = excluded.expires_at
RETURNING 1;

-- name: release_slot
DELETE FROM {schema}.slots WHERE bucket = %(bucket)s AND holder = %(holder)s;
