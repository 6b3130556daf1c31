-- ARGV: prefix, n, ids... (n = -1: every failed job). Failed or cancelled jobs go back to
-- queued with a fresh attempt budget, unless another job with the same key is pending.
local n = tonumber(ARGV[2])
local now = now_s()
local ids = {}
if n < 0 then
  for _, q in ipairs(redis.call('SMEMBERS', P .. 'queues')) do
    for _, id in ipairs(redis.call('ZRANGE', qkey(q, 'failed'), 0, -1)) do ids[#ids + 1] = id end
  end
else
  for i = 1, n do ids[#ids + 1] = ARGV[2 + i] end
end
local out = {}
for _, id in ipairs(ids) do
  local jk = job_key(id)
  local f = redis.call('HMGET', jk, 'state', 'queue', 'key', 'priority')
  local state, queue, key = f[1], f[2], f[3]
  if state == 'failed' or state == 'cancelled' then
    local holder = key and redis.call('GET', P .. 'key:' .. key)
    if not holder or holder == id then
      if key then redis.call('SET', P .. 'key:' .. key, id) end
      redis.call('ZREM', qkey(queue, state), id)
      redis.call('PERSIST', jk)
      redis.call('HSET', jk, 'state', 'queued', 'attempt', 0, 'lost_leases', 0, 'run_at', now,
        'cancel_requested', 0)
      redis.call('HDEL', jk, 'finished_at', 'started_at')
      push_ready(id, queue, f[4], now)
      wake(queue)
      out[#out + 1] = id
    end
  end
end
return out
