-- ARGV: prefix, after (a position in `jobs`, or '' for the newest), wanted, index keys... (the
-- state and queue indexes of a narrow listing: sorted sets, or the set of running jobs).
-- Their jobs newest first by position in `jobs`: the first `wanted` before `after`, as flat
-- position, id pairs. Sorting here sends back a page, not every id of the indexes; the caller
-- keeps the indexes small (a few thousand jobs), as each call reads all of them.
local after = tonumber(ARGV[2])
local wanted = tonumber(ARGV[3])
local jobs_key = P .. 'jobs'
local found = {}
for i = 4, #ARGV do
  local key = ARGV[i]
  local members
  if redis.call('TYPE', key).ok == 'set' then
    members = redis.call('SMEMBERS', key)
  else
    members = redis.call('ZRANGE', key, 0, -1)
  end
  for _, id in ipairs(members) do
    local seq = tonumber(redis.call('ZSCORE', jobs_key, id))
    if seq and (after == nil or seq < after) then found[#found + 1] = {seq, id} end
  end
end
table.sort(found, function(a, b) return a[1] > b[1] end)
local out = {}
for i = 1, math.min(wanted, #found) do
  out[#out + 1] = tostring(found[i][1])
  out[#out + 1] = found[i][2]
end
return out
