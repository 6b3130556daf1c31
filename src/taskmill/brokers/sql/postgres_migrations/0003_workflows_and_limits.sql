-- Workflows (chains, groups, chords): the compiled graph of each, and whether it still runs.
-- Its steps are ordinary jobs whose ids name the workflow and the step; a running workflow is
-- swept by workers until it ends, and an ended one is pruned with finished jobs.

CREATE TABLE {schema}.workflows (
    id          text        PRIMARY KEY,
    spec        bytea       NOT NULL,
    state       text        NOT NULL
                    CHECK (state IN ('running', 'succeeded', 'failed', 'cancelled')),
    created_at  timestamptz NOT NULL,
    finished_at timestamptz
);
CREATE INDEX workflows_running ON {schema}.workflows (created_at) WHERE state = 'running';
CREATE INDEX workflows_ended ON {schema}.workflows (finished_at) WHERE state <> 'running';

-- Rate limits: per bucket (a task's or a queue's), the theoretical time of the next start
-- (GCRA). A worker reserves the next start and waits for it.
CREATE TABLE {schema}.rate_limits (
    bucket text        PRIMARY KEY,
    tat    timestamptz NOT NULL
);

-- Concurrency limits: who holds a slot of a bucket, until when (a dead worker's slot expires).
CREATE TABLE {schema}.slots (
    bucket     text        NOT NULL,
    holder     text        NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (bucket, holder)
);
