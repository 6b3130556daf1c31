-- ARGV: prefix, queue. Deletes the queue's scheduled and queued jobs; returns how many.
local queue = ARGV[2]
local count = 0
local function drop(id)
  local key = redis.call('HGET', job_key(id), 'key')
  if key and redis.call('GET', P .. 'key:' .. key) == id then redis.call('DEL', P .. 'key:' .. key) end
  redis.call('DEL', job_key(id))
  redis.call('ZREM', P .. 'jobs', id)
  count = count + 1
end
for _, m in ipairs(redis.call('ZRANGE', qkey(queue, 'ready'), 0, -1)) do drop(m) end
for _, id in ipairs(redis.call('ZRANGE', qkey(queue, 'scheduled'), 0, -1)) do drop(id) end
redis.call('DEL', qkey(queue, 'ready'), qkey(queue, 'scheduled'))
return count
