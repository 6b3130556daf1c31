-- apply_finishes(base, now): finishes start at ARGV[base] (result_ttl), ARGV[base+1] (n).
local function apply_finishes(base, now)
  local ttl, n = tonumber(ARGV[base]), tonumber(ARGV[base + 1])
  local applied, due = {}, {}
  for i = 0, n - 1 do
    local b = base + 1 + i * 5
    local id, token, kind, a, bb = ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4], ARGV[b + 5]
    local jk = job_key(id)
    local f = redis.call('HMGET', jk, 'state', 'lease_token', 'queue', 'key', 'priority')
    if f[1] ~= 'running' or f[2] ~= token then
      applied[#applied + 1] = '0'
    else
      local queue = f[3]
      redis.call('ZREM', P .. 'running', id)
      redis.call('SREM', qkey(queue, 'running'), id)
      redis.call('HDEL', jk, 'lease_token', 'lease_expires_at')
      if kind == 'S' then
        redis.call('HSET', jk, 'state', 'succeeded', 'result', a, 'finished_at', now)
        finished(id, queue, 'succeeded', f[4], now, ttl)
      elseif kind == 'F' then
        redis.call('HSET', jk, 'state', 'failed', 'error', a, 'finished_at', now)
        finished(id, queue, 'failed', f[4], now, ttl)
      elseif kind == 'C' then
        redis.call('HSET', jk, 'state', 'cancelled', 'finished_at', now)
        finished(id, queue, 'cancelled', f[4], now, ttl)
      elseif kind == 'R' then
        local run_at = now + tonumber(a)
        redis.call('HSET', jk, 'error', bb, 'run_at', run_at)
        redis.call('HDEL', jk, 'worker_id')
        if run_at <= now then
          redis.call('HSET', jk, 'state', 'queued')
          push_ready(id, queue, f[5], run_at)
        else
          redis.call('HSET', jk, 'state', 'scheduled')
          redis.call('ZADD', qkey(queue, 'scheduled'), run_at, id)
        end
        due[queue] = true -- an idle worker must learn of the new run_at to wake for it
      else -- 'L': released unstarted
        local attempt = tonumber(redis.call('HGET', jk, 'attempt') or 0)
        if attempt > 0 then redis.call('HSET', jk, 'attempt', attempt - 1) end
        redis.call('HDEL', jk, 'worker_id', 'started_at')
        redis.call('HSET', jk, 'state', 'queued')
        push_ready(id, queue, f[5], redis.call('HGET', jk, 'run_at'))
        due[queue] = true
      end
      applied[#applied + 1] = '1'
    end
  end
  for queue in pairs(due) do wake(queue) end
  return table.concat(applied)
end
