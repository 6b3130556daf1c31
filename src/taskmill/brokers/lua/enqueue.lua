-- ARGV: prefix, on_conflict ('return'|'raise'), n, then 11 fields per job:
-- id, task, queue, payload, priority, run_at ('' = none), delay_s, max_attempts, timeout_s, key,
-- meta ('' = none)
-- Returns only the exceptions, as {position (1-based), existing id, ...}: jobs stored already
-- under their id (a producer retrying after a lost reply, a tick two schedulers saw), and jobs
-- whose key matched a pending job. Every other job was stored under the id the caller chose.
-- A send() is one call of this script with one job: what runs for each job is kept to the
-- commands it needs, and each key name is built once.
local on_conflict, n = ARGV[2], tonumber(ARGV[3])
local F = 11
local now = now_s()
-- Before any write (a 'raise' must leave nothing behind): the jobs stored already under their
-- id, and those whose key a pending job holds. The first job's EXISTS also asks for `idle` (a
-- worker may be waiting, see below): a count of 0 or 2 answers both, 1 takes a second look.
local existing, batch_ids, batch_keys = {}, {}, {}
local idle
for i = 0, n - 1 do
  local b = 3 + i * F
  local id, key = ARGV[b + 1], ARGV[b + 10]
  local stored = batch_ids[id]
  if not stored then
    local jk = P .. 'job:' .. id
    if idle == nil then
      local found = redis.call('EXISTS', jk, P .. 'idle')
      if found == 1 then
        stored = redis.call('EXISTS', jk) == 1
        idle = not stored
      else
        stored, idle = found == 2, found == 2
      end
    else
      stored = redis.call('EXISTS', jk) == 1
    end
  end
  if stored then
    existing[i] = id
  elseif key ~= '' then
    local ex = redis.call('GET', P .. 'key:' .. key) or batch_keys[key]
    if ex then
      if on_conflict == 'raise' then
        return redis.error_reply('DUPLICATE ' .. ex .. ' ' .. key)
      end
      existing[i] = ex
    else
      batch_keys[key] = id
    end
  end
  batch_ids[id] = true
end
-- Hand-overs, only while a worker may be idle (a worker registers for them after a claim that
-- found nothing, which sets `idle`; without it, a busy system or one with no workers, an
-- enqueue neither hands over nor wakes anyone), and per queue only while nothing is ready or
-- overdue there (the new job is first in line) and the queue is not paused: can_hand[queue]
-- turns false once that stops being true for this call.
local can_hand, due = {}, {}
local function hand_over(id, queue)
  if can_hand[queue] == nil then
    can_hand[queue] = redis.call('SISMEMBER', P .. 'paused', queue) == 0
      and redis.call('ZCARD', qkey(queue, 'ready')) == 0
      and #redis.call('ZRANGEBYSCORE', qkey(queue, 'scheduled'), '-inf', now, 'LIMIT', 0, 1) == 0
  end
  if not can_hand[queue] then return false end
  local idlers = qkey(queue, 'idlers')
  while true do
    local top = redis.call('ZPOPMAX', idlers)
    if #top == 0 then
      can_hand[queue] = false
      return false
    end
    local worker = top[1]
    local lease = tonumber(top[2]) > now and redis.call('GET', worker_key(worker, 'idle'))
    if lease then
      redis.call('DEL', worker_key(worker, 'idle'))
      local token = string.format('h%.6f', now)
      start_job(id, queue, worker, token, now + tonumber(lease), now)
      local handed, inbox = worker_key(worker, 'handed'), worker_key(worker, 'inbox')
      local ttl = math.ceil(tonumber(lease)) + 60
      redis.call('SADD', handed, id .. ' ' .. token)
      redis.call('RPUSH', inbox, id .. ' ' .. token .. ' ' .. pack_fields(claimed_fields(job_key(id))))
      redis.call('EXPIRE', handed, ttl)
      redis.call('EXPIRE', inbox, ttl)
      return true
    end
  end
end
-- `jobs` lists every job in the order stored (score: a counter), for listings newest first;
-- one INCRBY reserves the batch's numbers (those of jobs stored already are skipped), and one
-- ZADD per 500 jobs indexes them
local seq = redis.call('INCRBY', P .. 'seq', n) - n
local jobs_key, indexed = P .. 'jobs', {}
local out, seen_queues = {}, {}
for i = 0, n - 1 do
  local b = 3 + i * F
  local id = ARGV[b + 1]
  if existing[i] then
    out[#out + 1] = i + 1
    out[#out + 1] = existing[i]
  else
    local jk = P .. 'job:' .. id
    local queue, priority, key = ARGV[b + 3], ARGV[b + 5], ARGV[b + 10]
    local run_at = now + tonumber(ARGV[b + 7])
    if ARGV[b + 6] ~= '' then run_at = tonumber(ARGV[b + 6]) end
    local state = 'scheduled'
    if run_at <= now then state = 'queued' end
    -- counters that start at 0 (attempt, lost_leases, cancel_requested) are left out until set
    redis.call('HSET', jk, 'id', id, 'task', ARGV[b + 2], 'queue', queue,
      'state', state, 'payload', ARGV[b + 4], 'priority', priority,
      'max_attempts', ARGV[b + 8], 'run_at', run_at, 'enqueued_at', now)
    if #ARGV[b + 4] > LONG_PAYLOAD then redis.call('HSET', jk, 'long_payload', 1) end
    if ARGV[b + 9] ~= '' then redis.call('HSET', jk, 'timeout_s', ARGV[b + 9]) end
    if ARGV[b + 11] ~= '' then redis.call('HSET', jk, 'meta', ARGV[b + 11]) end
    indexed[#indexed + 1] = seq + i + 1
    indexed[#indexed + 1] = id
    if #indexed >= 1000 then
      redis.call('ZADD', jobs_key, unpack(indexed))
      indexed = {}
    end
    if key ~= '' then
      redis.call('HSET', jk, 'key', key)
      redis.call('SET', P .. 'key:' .. key, id)
    end
    if not seen_queues[queue] then
      redis.call('SADD', P .. 'queues', queue)
      seen_queues[queue] = true
    end
    if state ~= 'queued' then
      redis.call('ZADD', qkey(queue, 'scheduled'), run_at, id)
      due[queue] = true  -- an idle worker learns of it and shortens its wait to the run_at
    elseif not (idle and hand_over(id, queue)) then
      push_ready(id, queue, priority, run_at)
      can_hand[queue] = false
      due[queue] = true
    end
  end
end
if #indexed > 0 then redis.call('ZADD', jobs_key, unpack(indexed)) end
if idle then
  for queue in pairs(due) do wake(queue) end
end
return out
