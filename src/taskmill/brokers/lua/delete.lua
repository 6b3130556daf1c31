-- ARGV: prefix, job ids. Deletes the finished jobs among them (their hash and index entries);
-- returns the ids deleted, in the order given. A job whose hash expired already is left out.
local deleted = {}
for i = 2, #ARGV do
  local id = ARGV[i]
  local jk = job_key(id)
  local f = redis.call('HMGET', jk, 'state', 'queue')
  local state = f[1]
  if state == 'succeeded' or state == 'failed' or state == 'cancelled' then
    redis.call('DEL', jk)
    redis.call('ZREM', qkey(f[2], state), id)
    redis.call('ZREM', P .. 'jobs', id)
    deleted[#deleted + 1] = id
  end
end
return deleted
