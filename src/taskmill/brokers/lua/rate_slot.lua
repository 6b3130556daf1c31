-- ARGV: prefix, bucket, interval seconds. Reserves the next start of a rate-limited bucket
-- (GCRA: one start per interval, no burst) on the server's clock; returns how many seconds
-- from now that start is, as a string (0 means now). The key expires once it is in the past.
local key = P .. 'rate:' .. ARGV[2]
local interval = tonumber(ARGV[3])
local now = now_s()
local start = math.max(tonumber(redis.call('GET', key) or '0'), now)
redis.call('SET', key, string.format('%.6f', start + interval),
  'PX', math.ceil((start + interval - now) * 1000) + 1000)
return string.format('%.6f', start - now)
