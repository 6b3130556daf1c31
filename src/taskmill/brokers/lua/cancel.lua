-- ARGV: prefix, id, result_ttl. Scheduled/queued: cancelled now. Running: a cancel is
-- requested (the worker ends it). Returns the state after, or false if there is no such job.
local id, ttl = ARGV[2], tonumber(ARGV[3])
local jk = job_key(id)
local f = redis.call('HMGET', jk, 'state', 'queue', 'priority', 'run_at', 'key')
local state, queue = f[1], f[2]
if not state then return false end
if state == 'scheduled' or state == 'queued' then
  redis.call('ZREM', qkey(queue, 'scheduled'), id)
  redis.call('ZREM', qkey(queue, 'ready'), id)
  local now = now_s()
  redis.call('HSET', jk, 'state', 'cancelled', 'finished_at', now)
  finished(id, queue, 'cancelled', f[5], now, ttl)
  return 'cancelled'
end
if state == 'running' then redis.call('HSET', jk, 'cancel_requested', 1) end
return state
