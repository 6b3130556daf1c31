-- ARGV: prefix, max_lost_leases, result_ttl, error_type, message. Jobs whose lease expired go
-- back to queued (the attempt stays spent), or to failed once they lost max_lost_leases leases,
-- or to cancelled if a cancel was asked. Returns {id, new state, ...}. The error's type and
-- message come from Python (taskmill.brokers._rows): {attempt}, {worker} and {lost_leases} in
-- the message are filled in here.
local max_lost, ttl = tonumber(ARGV[2]), tonumber(ARGV[3])
local error_type, template = ARGV[4], ARGV[5]

-- plain-text replacement (string.gsub would read both texts as patterns)
local function fill(text, field, value)
  local i, j = string.find(text, field, 1, true)
  while i do
    text = string.sub(text, 1, i - 1) .. value .. string.sub(text, j + 1)
    i, j = string.find(text, field, i + #value, true)
  end
  return text
end

local now = now_s()
local out, due = {}, {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'running', '-inf', now, 'LIMIT', 0, 500)) do
  local jk = job_key(id)
  local f = redis.call('HMGET', jk, 'state', 'queue', 'lost_leases', 'cancel_requested',
    'attempt', 'worker_id', 'key', 'priority', 'run_at', 'lease_expires_at')
  redis.call('ZREM', P .. 'running', id)
  if f[1] == 'running' and tonumber(f[10]) < now then
    local queue, lost = f[2], tonumber(f[3] or 0) + 1
    redis.call('SREM', qkey(queue, 'running'), id)
    local message = fill(fill(fill(template, '{attempt}', f[5] or '0'),
      '{lost_leases}', tostring(lost)), '{worker}', f[6] or '?')
    local err = cjson.encode({type = error_type, message = message, traceback = ''})
    redis.call('HSET', jk, 'lost_leases', lost, 'error', err)
    redis.call('HDEL', jk, 'lease_token', 'lease_expires_at', 'worker_id')
    local state = 'queued'
    if f[4] == '1' then state = 'cancelled' elseif lost >= max_lost then state = 'failed' end
    redis.call('HSET', jk, 'state', state)
    if state == 'queued' then
      push_ready(id, queue, f[8], f[9])
      due[queue] = true
    else
      redis.call('HSET', jk, 'finished_at', now)
      finished(id, queue, state, f[7], now, ttl)
    end
    out[#out + 1] = id
    out[#out + 1] = state
  end
end
for queue in pairs(due) do wake(queue) end
return out
