-- ARGV: prefix, workflow id, state, ttl seconds. A running workflow ends as `state`; its hash
-- then expires with finished jobs' results. Returns 1 if it was running, else 0.
local key = P .. 'wf:' .. ARGV[2]
if redis.call('HGET', key, 'state') ~= 'running' then return 0 end
redis.call('HSET', key, 'state', ARGV[3], 'finished_at', now_s())
redis.call('EXPIRE', key, tonumber(ARGV[4]))
redis.call('ZREM', P .. 'workflows', ARGV[2])
return 1
