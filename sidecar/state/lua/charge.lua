-- charge.lua: move a bucket by a cost without checking it, e.g. to reconcile an estimated
-- token cost with the real one after the response. A negative cost refunds, but never past a
-- full bucket (the TAT never goes before now).
--
-- KEYS[1]  the bucket  qos:{tenant}:bucket:<name>
-- ARGV[1]  rate_per_s
-- ARGV[2]  cost (may be negative)
--
-- Returns the bucket's new TAT minus now, in seconds (string): how long until it is full.

local now = now_s()
local rate, cost = tonumber(ARGV[1]), tonumber(ARGV[2])
local stored = redis.call('GET', KEYS[1])
local tat = now
if stored then
  tat = math.max(tonumber(stored), now)
end
local new_tat = math.max(tat + cost / rate, now)
if new_tat > now then
  redis.call('SET', KEYS[1], fmt(new_tat), 'PX', ttl_ms(new_tat - now))
else
  redis.call('DEL', KEYS[1]) -- full again: same as an expired key
end
return fmt(new_tat - now)
