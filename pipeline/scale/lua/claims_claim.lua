-- Claim a free or expired shard under a new, higher epoch.
-- KEYS: meta, leases (ZSET shard -> expiry ms), owners (HASH shard -> owner:epoch), epoch (counter).
-- ARGV: owner, ttl ms.
-- Returns {shard, epoch, expiry ms}; {0, 0, 0} when every shard is done; {-1, 0, ms until the
-- next lease expires} when every shard left is held.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('UNREGISTERED the run has no shards in this Redis')
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local free = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 1)
if #free == 0 then
  local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  if #first == 0 then
    return {0, 0, 0}
  end
  return {-1, 0, tonumber(first[2]) - now}
end
local shard = free[1]
-- Epochs never go below the Redis clock in ms: state lost with a restarted Redis still issues
-- epochs above every earlier one (the clock is slewed, never stepped).
local epoch = redis.call('INCR', KEYS[4])
if epoch < now then
  epoch = now
  redis.call('SET', KEYS[4], epoch)
end
local expiry = now + tonumber(ARGV[2])
redis.call('ZADD', KEYS[2], expiry, shard)
redis.call('HSET', KEYS[3], shard, ARGV[1] .. ':' .. epoch)
return {tonumber(shard), epoch, expiry}
