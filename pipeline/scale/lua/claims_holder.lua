-- beat, done and release: only the current owner:epoch, and only while its lease is live.
-- KEYS: leases, owners, done. ARGV: action (beat|done|release), shard, owner:epoch, ttl ms.
-- Returns the new expiry in ms for beat, 1 for done and release; 0 when refused.
local shard = ARGV[2]
if redis.call('HGET', KEYS[2], shard) ~= ARGV[3] then
  return 0
end
local expiry = redis.call('ZSCORE', KEYS[1], shard)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if not expiry or tonumber(expiry) <= now then
  return 0
end
local action = ARGV[1]
if action == 'beat' then
  local until_ms = now + tonumber(ARGV[4])
  redis.call('ZADD', KEYS[1], until_ms, shard)
  return until_ms
elseif action == 'done' then
  redis.call('ZREM', KEYS[1], shard)
  redis.call('SADD', KEYS[3], shard)
  return 1
elseif action == 'release' then
  redis.call('ZADD', KEYS[1], 0, shard)
  return 1
end
return redis.error_reply('ACTION unknown: ' .. action)
