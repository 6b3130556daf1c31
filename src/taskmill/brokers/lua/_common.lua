-- Shared by every script (prepended when loaded). Keys all start with the prefix ARGV[1].
-- Times come from the server's clock (TIME), so workers with skewed clocks agree.
local P = ARGV[1]
local function now_s()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function job_key(id) return P .. 'job:' .. id end
local function qkey(queue, what) return P .. 'q:' .. queue .. ':' .. what end
-- ready jobs: score -priority (lowest pops first), ties ordered by the member's text, which
-- starts with run_at in ms and the enqueue sequence, zero-padded: FIFO within a priority
local function ready_member(run_at, seq, id)
  return string.format('%015.0f:%012.0f:', math.floor(run_at * 1000), seq) .. id
end
local function push_ready(id, queue, priority, run_at, seq)
  redis.call('ZADD', qkey(queue, 'ready'), -tonumber(priority), ready_member(tonumber(run_at), tonumber(seq), id))
end
local function wake()
  redis.call('XADD', P .. 'wake', 'MAXLEN', '~', 64, '*', 'w', 1)
end
-- a finished job: indexed by finish time for stats, listing and pruning; its unique key freed;
-- the hash expires after the result TTL
local function finished(id, queue, state, key, now, ttl)
  redis.call('ZADD', qkey(queue, state), now, id)
  if key and key ~= '' and redis.call('GET', P .. 'key:' .. key) == id then
    redis.call('DEL', P .. 'key:' .. key)
  end
  if ttl > 0 then redis.call('EXPIRE', job_key(id), math.ceil(ttl)) end
end
