-- ARGV: prefix, id. A scheduled job becomes queued and due now (its attempt count unchanged)
-- and a worker of its queue is woken. Returns the state before, or false if there is no job.
local id = ARGV[2]
local jk = job_key(id)
local f = redis.call('HMGET', jk, 'state', 'queue', 'priority')
local state, queue = f[1], f[2]
if not state then return false end
if state == 'scheduled' then
  local now = now_s()
  redis.call('ZREM', qkey(queue, 'scheduled'), id)
  redis.call('HSET', jk, 'state', 'queued', 'run_at', now)
  push_ready(id, queue, f[3], now)
  wake(queue)
end
return state
