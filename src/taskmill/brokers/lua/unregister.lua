-- ARGV: prefix, worker, na, acknowledged hand-overs ('id token' each). A worker leaving: out of
-- the registry and the hand-over sets; jobs handed over that it never received go back to their
-- queues unspent.
local worker = ARGV[2]
redis.call('DEL', P .. 'worker:' .. worker, worker_key(worker, 'idle'))
-- its wait may still be on its way here (shielded from the cancel that stopped the worker):
-- idle.lua refuses to register a worker that signed off (ids are never reused)
redis.call('SET', worker_key(worker, 'gone'), 1, 'EX', 300)
redis.call('ZREM', P .. 'workers', worker)
for _, id in ipairs(unacknowledged(worker, 4, tonumber(ARGV[3]))) do
  local jk = job_key(id)
  local f = redis.call('HMGET', jk, 'queue', 'priority', 'run_at', 'attempt')
  redis.call('ZREM', P .. 'running', id)
  redis.call('SREM', qkey(f[1], 'running'), id)
  redis.call('HDEL', jk, 'lease_token', 'lease_expires_at', 'worker_id', 'started_at')
  redis.call('HSET', jk, 'state', 'queued', 'attempt', math.max(0, tonumber(f[4]) - 1))
  push_ready(id, f[1], f[2], f[3])
  wake(f[1])
end
return 1
