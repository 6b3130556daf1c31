-- ARGV: prefix, finished_before, limit. Deletes finished jobs older than given (their hashes
-- may have expired already) and their index entries; also forgets workers silent for an hour.
local before, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
local count = 0
for _, q in ipairs(redis.call('SMEMBERS', P .. 'queues')) do
  for _, state in ipairs({'succeeded', 'failed', 'cancelled'}) do
    if count < limit then
      local ids = redis.call('ZRANGEBYSCORE', qkey(q, state), '-inf', before, 'LIMIT', 0, limit - count)
      for _, id in ipairs(ids) do
        redis.call('DEL', job_key(id))
        redis.call('ZREM', qkey(q, state), id)
        redis.call('ZREM', P .. 'jobs', id)
      end
      count = count + #ids
    end
  end
end
local now = now_s()
for _, w in ipairs(redis.call('ZRANGEBYSCORE', P .. 'workers', '-inf', now - 3600)) do
  redis.call('ZREM', P .. 'workers', w)
end
return count
