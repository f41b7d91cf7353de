-- The lease limiter of pipeline/scale/lease.py (LeaseAlgorithm), on Redis's clock.
-- KEYS[1]: the account's state hash (tat, total, quiet); KEYS[2]: its log of grants ("<us>:<n>").
-- ARGV: want, limit, span_us (S = 1 s + ttl + jitter), burst, tolerance_us, idle_ms.
-- Returns {granted, wait_us, now_us}. Times are integer microseconds; arithmetic as in Python.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local want, limit, span = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local burst, tolerance, idle = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local function int(x) return string.format('%d', x) end

local state = redis.call('HMGET', KEYS[1], 'tat', 'total', 'quiet')
local tat, total, quiet = tonumber(state[1]), tonumber(state[2]), tonumber(state[3])
if tat == nil or total == nil or quiet == nil or (total > 0 and redis.call('LLEN', KEYS[2]) == 0) then
  -- New state (first use, restart, expired or evicted keys): grants of a lost state may
  -- still be in use, so nothing is granted for one span.
  tat, total, quiet = now, 0, now + span
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'tat', int(tat), 'total', 0, 'quiet', int(quiet))
end
redis.call('PEXPIRE', KEYS[1], idle)
redis.call('PEXPIRE', KEYS[2], idle)
if now < quiet then
  return {0, quiet - now, now}
end

-- The sliding log: grants in (now - S, now] never add up to more than limit.
local trimmed = false
while true do
  local head = redis.call('LINDEX', KEYS[2], 0)
  if not head then break end
  local sep = string.find(head, ':', 1, true)
  if tonumber(string.sub(head, 1, sep - 1)) > now - span then break end
  total = total - tonumber(string.sub(head, sep + 1))
  redis.call('LPOP', KEYS[2])
  trimmed = true
end
if trimmed then
  redis.call('HSET', KEYS[1], 'total', int(total))
end
local n = math.min(want, burst, limit - total)
if n <= 0 then
  local head = redis.call('LINDEX', KEYS[2], 0)
  local oldest = tonumber(string.sub(head, 1, string.find(head, ':', 1, true) - 1))
  return {0, oldest + span - now, now}
end

-- GCRA pacing at limit / S: a lease is granted whole or not at all.
local new_tat = math.ceil(math.max(tat, now) + n * span / limit)
if new_tat - now > tolerance then
  return {0, new_tat - now - tolerance, now}
end
redis.call('HSET', KEYS[1], 'tat', int(new_tat), 'total', int(total + n))
redis.call('RPUSH', KEYS[2], int(now) .. ':' .. int(n))
return {n, 0, now}
