-- ARGV: prefix, worker_id, lease_s, limit, token, nq, queue..., na, acknowledged hand-overs
-- ('id token' each), then finishes as in finish.lua (result_ttl, nf, 5 fields each) so a busy
-- worker reports and claims in one call.
-- Returns {now, applied finishes (0/1 each, as one string), job1 fields, ...}.
local worker, lease, limit, token = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local nq = tonumber(ARGV[6])
local na = tonumber(ARGV[7 + nq])
local now = now_s()
local applied = apply_finishes(8 + nq + na, now)
local out = {tostring(now), applied}
-- busy now: the hand-over registration ends, and jobs handed over that the worker's wait did
-- not deliver (they raced its wake-up, or the wait was cancelled) are its claims
redis.call('DEL', worker_key(worker, 'idle'))
for _, id in ipairs(unacknowledged(worker, 8 + nq, na)) do
  out[#out + 1] = claimed_fields(job_key(id))
  limit = limit - 1
end
local paused = {}
for _, q in ipairs(redis.call('SMEMBERS', P .. 'paused')) do paused[q] = true end
local candidates = {}
for i = 1, nq do
  local q = ARGV[6 + i]
  if not paused[q] then
    -- promote scheduled jobs that came due
    local due = redis.call('ZRANGEBYSCORE', qkey(q, 'scheduled'), '-inf', now, 'LIMIT', 0, 1000)
    for _, id in ipairs(due) do
      local f = redis.call('HMGET', job_key(id), 'state', 'priority', 'run_at')
      if f[1] == 'scheduled' then
        redis.call('HSET', job_key(id), 'state', 'queued')
        push_ready(id, q, f[2], f[3])
      end
      redis.call('ZREM', qkey(q, 'scheduled'), id)
    end
    if limit > 0 then  -- (0 - 1 would read the whole set)
      local top = redis.call('ZRANGE', qkey(q, 'ready'), 0, limit - 1, 'WITHSCORES')
      for j = 1, #top, 2 do
        candidates[#candidates + 1] = {tonumber(top[j + 1]), top[j], q}
      end
    end
  end
end
if nq > 1 then
  table.sort(candidates, function(a, b)
    if a[1] ~= b[1] then return a[1] < b[1] end
    return a[2] < b[2]
  end)
end
if limit > 0 and #candidates == 0 then redis.call('SET', P .. 'idle', 1, 'EX', 90) end
local expires = now + lease
for i = 1, math.min(limit, #candidates) do
  local c = candidates[i]
  redis.call('ZREM', qkey(c[3], 'ready'), c[2])
  local id = c[2]
  local jk = job_key(id)
  local f = redis.call('HMGET', jk, 'state', 'long_payload')
  if f[1] == 'queued' then
    start_job(id, c[3], worker, token, expires, now)
    out[#out + 1] = claimed_fields(jk, f[2])
  end
end
-- took all it could and more is ready: pass a token on to another idle worker
if #candidates > limit then wake(candidates[limit + 1][3]) end
return out
