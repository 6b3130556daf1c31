-- Job metadata (issue 10): a small JSON object set at send, NULL for none. Not indexed: a
-- listing filtered by it reads the rows its other filters select (see docs/admin.md).

ALTER TABLE {schema}.jobs ADD COLUMN meta jsonb;
