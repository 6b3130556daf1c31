-- ARGV: prefix, workflow id, spec. Stores a new running workflow (an id stored already keeps
-- what it has) and indexes it by creation time among the running ones.
local key = P .. 'wf:' .. ARGV[2]
if redis.call('EXISTS', key) == 1 then return 0 end
local now = now_s()
redis.call('HSET', key, 'spec', ARGV[3], 'state', 'running', 'created_at', now)
redis.call('ZADD', P .. 'workflows', now, ARGV[2])
return 1
