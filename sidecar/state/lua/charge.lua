-- charge.lua: move buckets of one tenant by a cost each without checking them, e.g. to
-- reconcile an estimated token cost with the real one after the response, or to give back
-- what a request that was never served took. A negative cost refunds, but never past a full
-- bucket (the TAT never goes before now). All buckets move in this one call, so a refund is
-- never half applied.
--
-- KEYS[i]      the i-th bucket  qos:{tenant}:bucket:<name>  (every key: the tenant's hash tag)
-- ARGV[2i-1]   its rate_per_s
-- ARGV[2i]     its cost (may be negative)
--
-- Returns the number of buckets moved.

local now = now_s()
for i, key in ipairs(KEYS) do
  local rate, cost = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  local stored = redis.call('GET', key)
  local tat = now
  if stored then
    tat = math.max(tonumber(stored), now)
  end
  local new_tat = math.max(tat + cost / rate, now)
  if new_tat > now then
    redis.call('SET', key, fmt(new_tat), 'PX', ttl_ms(new_tat - now))
  else
    redis.call('DEL', key) -- full again: same as an expired key
  end
end
return #KEYS
