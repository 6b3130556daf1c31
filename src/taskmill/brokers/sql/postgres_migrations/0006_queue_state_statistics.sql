-- Issue 12. Counts at size: on a large table the finished jobs per queue and state are
-- estimated from the planner's statistics (counting a million rows takes longer than a
-- dashboard may wait; see the stats and finished_estimates queries). These statistics give
-- each (queue, state) pair its own share of the rows, where the two columns' statistics alone
-- would multiply their frequencies (wrong when a queue fails more often than another).
-- Autovacuum analyzes the table after 2 % of its rows changed rather than 10 %, so estimates
-- stay close on a large table; the ANALYZE here gives an upgraded table its statistics at once.

CREATE STATISTICS {schema}.jobs_queue_state (mcv) ON queue, state FROM {schema}.jobs;

ALTER TABLE {schema}.jobs SET (autovacuum_analyze_scale_factor = 0.02);

ANALYZE {schema}.jobs;
