-- heartbeat.lua: say that this replica is alive for `ttl` more seconds, drop replicas whose
-- heartbeat has expired, and count the live ones (this one included). Each replica calls it
-- every few seconds; the count is remembered so that, when the store becomes unavailable, a
-- replica knows what share of every limit is its own (see sidecar.core.degraded).
--
-- KEYS[1]  qos:{=replicas}:heartbeats, a sorted set: member = replica id, score = expiry
-- ARGV[1]  replica id
-- ARGV[2]  ttl (seconds)
--
-- Returns the number of live replicas.

local now = now_s()
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], fmt(now + ttl), ARGV[1])
local live = count_leases(KEYS[1], now, true)
expire_lease_set(KEYS[1], now)
return live
