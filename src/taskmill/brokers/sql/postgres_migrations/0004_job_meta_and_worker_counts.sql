-- Issue 10. Job metadata: a small JSON object set at send, NULL for none. Not indexed: a listing
-- filtered by it reads the rows its other filters select (see docs/admin.md). Workers report
-- how many jobs they ran and how many of those raised, with each heartbeat.

ALTER TABLE {schema}.jobs ADD COLUMN meta jsonb;

ALTER TABLE {schema}.workers
    ADD COLUMN processed bigint NOT NULL DEFAULT 0,
    ADD COLUMN failed    bigint NOT NULL DEFAULT 0;
