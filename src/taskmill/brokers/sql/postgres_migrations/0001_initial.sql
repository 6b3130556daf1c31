-- The first schema of the PostgreSQL broker. {schema} is replaced by the schema's name (a plain
-- lowercase identifier, checked when the URL is read). Times are timestamptz from the server's
-- clock; the broker converts them to and from epoch seconds.

CREATE TABLE {schema}.jobs (
    seq              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id               text        NOT NULL UNIQUE,
    task             text        NOT NULL,
    queue            text        NOT NULL,
    state            text        NOT NULL CHECK (state IN
                         ('scheduled', 'queued', 'running', 'succeeded', 'failed', 'cancelled')),
    payload          bytea       NOT NULL,
    priority         integer     NOT NULL DEFAULT 0,
    attempt          integer     NOT NULL DEFAULT 0,
    max_attempts     integer     NOT NULL DEFAULT 1,
    run_at           timestamptz NOT NULL,
    enqueued_at      timestamptz NOT NULL,
    started_at       timestamptz,
    finished_at      timestamptz,
    timeout_s        double precision,
    key              text,
    lease_token      text,
    lease_expires_at timestamptz,
    worker_id        text,
    lost_leases      integer     NOT NULL DEFAULT 0,
    cancel_requested boolean     NOT NULL DEFAULT false,
    result           bytea,
    error            jsonb,
    progress         double precision,
    progress_message text
) WITH (
    -- Heartbeats and progress change no indexed column, so with room left on the page they
    -- are HOT updates: no new index entries, and the old row version is reclaimed in place.
    fillfactor = 80,
    -- A queue table turns over all the time: vacuum it after 1 % of its rows changed, not the
    -- default 20 %, so dead row versions do not pile up in the claim's index.
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_analyze_scale_factor = 0.02
);

-- Every index but the keys' is partial, so an insert touches three b-trees (seq, id, ready or
-- scheduled) and the claim walks only rows that can be claimed, however many finished rows
-- the table holds.

-- The claim: one ordered walk per queue, FOR UPDATE SKIP LOCKED.
CREATE INDEX jobs_ready ON {schema}.jobs (queue, priority DESC, run_at, seq)
    WHERE state = 'queued';
-- Promotion of due jobs, and the next due time an idle worker waits for.
CREATE INDEX jobs_scheduled ON {schema}.jobs (run_at) WHERE state = 'scheduled';
-- Recovery of expired leases scans the running jobs (bounded by the workers' slots). The lease
-- expiry is deliberately not indexed: a heartbeat then changes no indexed column (HOT update).
CREATE INDEX jobs_running ON {schema}.jobs (seq) WHERE state = 'running';
-- Pruning, oldest finished first.
CREATE INDEX jobs_finished ON {schema}.jobs (finished_at)
    WHERE state IN ('succeeded', 'failed', 'cancelled');
-- One pending job per unique key, across every producer (INSERT ... ON CONFLICT DO NOTHING).
CREATE UNIQUE INDEX jobs_pending_key ON {schema}.jobs (key)
    WHERE key IS NOT NULL AND state IN ('scheduled', 'queued', 'running');

CREATE TABLE {schema}.queues (
    name   text    PRIMARY KEY,
    paused boolean NOT NULL DEFAULT false
);

CREATE TABLE {schema}.workers (
    id           text        PRIMARY KEY,
    host         text        NOT NULL,
    pid          integer     NOT NULL,
    queues       text[]      NOT NULL,
    concurrency  integer     NOT NULL,
    started_at   timestamptz NOT NULL,
    heartbeat_at timestamptz NOT NULL,
    running      text[]      NOT NULL
);
