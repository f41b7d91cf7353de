-- Register a run's shards 1..n once. KEYS: meta, leases. ARGV: n.
-- Returns 1 when registered now, 0 when already registered with the same n; an error for another n.
local n = tonumber(ARGV[1])
local have = redis.call('HGET', KEYS[1], 'shards')
if have then
  if tonumber(have) ~= n then
    return redis.error_reply('SHARDS the run is registered with ' .. have .. ' shards')
  end
  return 0
end
redis.call('HSET', KEYS[1], 'shards', n)
for i = 1, n do
  redis.call('ZADD', KEYS[2], 'NX', 0, i)  -- score = lease expiry in Redis-clock ms, 0 = free
end
return 1
