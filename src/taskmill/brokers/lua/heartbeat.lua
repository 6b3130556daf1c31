-- ARGV: prefix, lease_s, worker_id, worker_json, worker_ttl_s, n, then id, token per claim.
-- Extends held leases and records the worker; returns {lost ids, ids with a cancel request}.
local lease, worker, info, wttl, n = tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
local now = now_s()
local expires = now + lease
local lost, cancel = {}, {}
for i = 0, n - 1 do
  local id, token = ARGV[7 + i * 2], ARGV[8 + i * 2]
  local f = redis.call('HMGET', job_key(id), 'state', 'lease_token', 'cancel_requested')
  if f[1] ~= 'running' or f[2] ~= token then
    lost[#lost + 1] = id
  else
    redis.call('HSET', job_key(id), 'lease_expires_at', expires)
    redis.call('ZADD', P .. 'running', expires, id)
    if f[3] == '1' then cancel[#cancel + 1] = id end
  end
end
redis.call('SET', P .. 'worker:' .. worker, info, 'EX', wttl)
redis.call('ZADD', P .. 'workers', now, worker)
return {lost, cancel}
