-- ARGV: prefix, bucket, holder, limit, ttl seconds. Holds one of `limit` slots of a
-- concurrency bucket for `holder` (a job id) until now + ttl, on the server's clock; a holder
-- that holds one already refreshes it. Expired holders are dropped first. Returns 1 if held.
local key = P .. 'slots:' .. ARGV[2]
local holder, limit, ttl = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local now = now_s()
redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
if not redis.call('ZSCORE', key, holder) and redis.call('ZCARD', key) >= limit then
  return 0
end
redis.call('ZADD', key, now + ttl, holder)
redis.call('EXPIRE', key, math.ceil(ttl) + 60)
return 1
