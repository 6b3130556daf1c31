-- Issue 11. Autovacuum cleans the jobs table at ten times its default pace (cost limit 2000
-- instead of vacuum_cost_limit's 200, a pause of 1 ms instead of 2 between rounds): the dead
-- entries that claims walk in the ready index go as soon as it runs. Measured after one
-- statement took a million jobs out of the queue: 4.0 s to clean the table instead of 19.8 s.

ALTER TABLE {schema}.jobs SET (
    autovacuum_vacuum_cost_limit = 2000,
    autovacuum_vacuum_cost_delay = 1
);
