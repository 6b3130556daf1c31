-- ARGV: prefix, n, then id, token, fraction ('' = none), message ('' = none) per report.
local n = tonumber(ARGV[2])
for i = 0, n - 1 do
  local b = 2 + i * 4
  local id, token = ARGV[b + 1], ARGV[b + 2]
  local jk = job_key(id)
  local f = redis.call('HMGET', jk, 'state', 'lease_token')
  if f[1] == 'running' and f[2] == token then
    if ARGV[b + 3] == '' then redis.call('HDEL', jk, 'progress')
    else redis.call('HSET', jk, 'progress', ARGV[b + 3]) end
    if ARGV[b + 4] == '' then redis.call('HDEL', jk, 'progress_message')
    else redis.call('HSET', jk, 'progress_message', ARGV[b + 4]) end
  end
end
return n
