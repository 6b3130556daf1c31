-- Shared by every script (prepended when loaded). Keys all start with the prefix ARGV[1].
-- Times come from the server's clock (TIME), so workers with skewed clocks agree.
local P = ARGV[1]
local function now_s()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function job_key(id) return P .. 'job:' .. id end
local function qkey(queue, what) return P .. 'q:' .. queue .. ':' .. what end
-- A job's hash for the worker that claimed it. A payload over 64 KiB (its hash says
-- `long_payload`, set at the send) is left out and `payload_apart` says so instead: Lua copies
-- a value it returns twice (into Lua, then into the reply), 0.4 ms of the server's one thread
-- for 256 KiB; the worker reads such a payload with HGET after. The fields are named, not
-- listed by HKEYS, so an ACL user needs no command beyond those docs/brokers.md lists.
local JOB_FIELDS_BUT_PAYLOAD = {
  'id', 'task', 'queue', 'state', 'priority', 'attempt', 'max_attempts', 'run_at',
  'enqueued_at', 'started_at', 'finished_at', 'timeout_s', 'key', 'lease_token',
  'lease_expires_at', 'worker_id', 'lost_leases', 'cancel_requested', 'result', 'error',
  'progress', 'progress_message', 'meta'}
local LONG_PAYLOAD = 65536
local function claimed_fields(jk, long)  -- long: its `long_payload` field, if read already
  if long == nil then long = redis.call('HGET', jk, 'long_payload') end
  if not long then return redis.call('HGETALL', jk) end
  local values = redis.call('HMGET', jk, unpack(JOB_FIELDS_BUT_PAYLOAD))
  local fields = {'payload_apart', '1'}
  for i, name in ipairs(JOB_FIELDS_BUT_PAYLOAD) do
    if values[i] then
      fields[#fields + 1] = name
      fields[#fields + 1] = values[i]
    end
  end
  return fields
end
-- ready jobs: the score orders by priority (higher first), then run_at in ms since 2025 (the
-- taskmill epoch): -priority * 2^40 + ms, exact in a double for |priority| <= 1000 and ~34 years
-- of run_at. Equal scores order by member, the time-ordered job id: FIFO within a priority.
local function ready_score(priority, run_at)
  return -tonumber(priority) * 1099511627776 + math.floor(tonumber(run_at) * 1000 - 1735689600000)
end
local function push_ready(id, queue, priority, run_at)
  redis.call('ZADD', qkey(queue, 'ready'), ready_score(priority, run_at), id)
end
-- Wake-ups: a token in the queue's wake list; an idle worker BLPOPs the lists of its queues,
-- so one token wakes one worker (no thundering herd), and a token pushed while nobody waits
-- stays for the next one. A claim that leaves work behind passes a token on (claim.lua).
local function wake(queue)
  local list = qkey(queue, 'wake')
  redis.call('LPUSH', list, 1)
  redis.call('LTRIM', list, 0, 63)
end
-- Enqueues wake workers only while one may be idle: a claim that found nothing (and a worker
-- about to block) sets `idle` for longer than any wait lasts, so a busy system (or one with no
-- workers) skips the push (enqueue.lua).
-- a finished job: indexed by finish time for stats, listing and pruning; its unique key freed;
-- the hash expires after the result TTL
local function finished(id, queue, state, key, now, ttl)
  redis.call('ZADD', qkey(queue, state), now, id)
  if key and key ~= '' and redis.call('GET', P .. 'key:' .. key) == id then
    redis.call('DEL', P .. 'key:' .. key)
  end
  if ttl > 0 then redis.call('EXPIRE', job_key(id), math.ceil(ttl)) end
end
-- a due job becomes a worker's: attempt + 1, a lease and the running indexes
local function start_job(id, queue, worker, token, expires, now)
  local jk = job_key(id)
  redis.call('HINCRBY', jk, 'attempt', 1)
  -- id and queue too: a hash written by another tool without them still names its job, and
  -- a finish can find its queue (the Python side fails a hash it cannot read as a job)
  redis.call('HSET', jk, 'state', 'running', 'lease_token', token, 'lease_expires_at', expires,
    'worker_id', worker, 'started_at', now, 'cancel_requested', 0, 'id', id, 'queue', queue)
  redis.call('ZADD', P .. 'running', expires, id)
  redis.call('SADD', qkey(queue, 'running'), id)
end
-- Hand-overs: a worker about to block registers in its queues' `idlers` sorted sets (score: when
-- the registration lapses) and under `w:{id}:idle` (its lease length, same lifetime). An enqueue
-- whose due job would be first in line claims it for such a worker, notes it in the worker's
-- `w:{id}:handed` set and pushes a packed copy onto `w:{id}:inbox`, a list its BLPOP watches:
-- the job starts without a claim round trip. A registration serves one job. The worker's next
-- claim ends it, acknowledges what its BLPOP delivered, and takes every other job in `handed`:
-- so a copy popped by a BLPOP whose reader was gone (a cancelled wait) is not a lost job.
local function worker_key(id, what) return P .. 'w:' .. id .. ':' .. what end
-- the job's hash as one string of netstrings ("3:foo5:hello"): byte-safe, no JSON escaping
local function pack_fields(fields)
  local parts = {}
  for i = 1, #fields do parts[i] = #fields[i] .. ':' .. fields[i] end
  return table.concat(parts)
end
-- jobs handed over to a worker and not acknowledged by it, still running under their hand-over
-- token; `acked` lists 'id token' members the worker did receive (ARGV[first..first+n-1])
local function unacknowledged(worker, first, n)
  local handed = worker_key(worker, 'handed')
  for i = first, first + n - 1 do redis.call('SREM', handed, ARGV[i]) end
  local ids = {}
  for _, member in ipairs(redis.call('SMEMBERS', handed)) do
    local id, token = string.match(member, '^(%S+) (%S+)$')
    local f = redis.call('HMGET', job_key(id), 'state', 'lease_token', 'worker_id')
    if f[1] == 'running' and f[2] == token and f[3] == worker then ids[#ids + 1] = id end
  end
  redis.call('DEL', handed, worker_key(worker, 'inbox'))
  return ids
end
