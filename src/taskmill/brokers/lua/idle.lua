-- ARGV: prefix, worker ('' = no hand-over), lease_s, ttl_s, nq, queue...
-- A worker about to block: when nothing is ready in its queues, register it for hand-overs
-- (enqueue.lua) for ttl_s. Returns {now, earliest scheduled run_at ('' = none), ready (0/1)}:
-- with ready = 1 the worker claims at once instead of blocking. A worker that signed off
-- (unregister.lua) is not registered again: its last wait can arrive after its sign-off.
local worker, lease, ttl, nq = ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local now = now_s()
local paused = {}
for _, q in ipairs(redis.call('SMEMBERS', P .. 'paused')) do paused[q] = true end
local next_due, ready = nil, 0
for i = 1, nq do
  local q = ARGV[5 + i]
  local first = redis.call('ZRANGE', qkey(q, 'scheduled'), 0, 0, 'WITHSCORES')
  if first[2] and (next_due == nil or tonumber(first[2]) < next_due) then
    next_due = tonumber(first[2])
  end
  if not paused[q] and redis.call('ZCARD', qkey(q, 'ready')) > 0 then ready = 1 end
end
if worker ~= '' and ready == 0 and redis.call('EXISTS', worker_key(worker, 'gone')) == 0 then
  redis.call('SET', P .. 'idle', 1, 'EX', 90)  -- what enqueues check before looking for idlers
  redis.call('SET', worker_key(worker, 'idle'), lease, 'PX', math.ceil(ttl * 1000))
  for i = 1, nq do
    local idlers = qkey(ARGV[5 + i], 'idlers')
    redis.call('ZREMRANGEBYSCORE', idlers, '-inf', now)  -- registrations that lapsed
    redis.call('ZADD', idlers, now + ttl, worker)
    redis.call('EXPIRE', idlers, math.ceil(ttl) + 1)
  end
end
return {tostring(now), next_due and tostring(next_due) or '', ready}
