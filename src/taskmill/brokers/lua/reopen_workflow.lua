-- ARGV: prefix, workflow id. A failed workflow is running again: no finish time, no expiry,
-- back among the running ones at its creation time. Returns 1 if it was failed, else 0.
local key = P .. 'wf:' .. ARGV[2]
if redis.call('HGET', key, 'state') ~= 'failed' then return 0 end
redis.call('HSET', key, 'state', 'running')
redis.call('HDEL', key, 'finished_at')
redis.call('PERSIST', key)
redis.call('ZADD', P .. 'workflows', redis.call('HGET', key, 'created_at'), ARGV[2])
return 1
