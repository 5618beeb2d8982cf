-- release.lua: free one lease, and remember for a while that its id was released.
--
-- KEYS[1]  the tenant's lease set                qos:{tenant}:leases
-- KEYS[2]  the tenant's lease set for the class  qos:{tenant}:class_leases:<class>
-- KEYS[3]  the lease id's tombstone              qos:{tenant}:released:<lease id>
-- ARGV[1]  the lease id
-- ARGV[2]  how long the tombstone lives, seconds (the lease TTL)
--
-- Returns 1 if the lease was held (present and unexpired), else 0. Releasing twice is safe.
-- The tombstone makes an acquire of the same id that runs after this (one the caller gave up
-- on, run late by a stalled server) take nothing, so a release may be sent for a request
-- whether or not its acquire ran. An acquire can only be late by as long as the server
-- stalled; a tombstone as long as the lease TTL covers every stall the lease itself would.
-- The sets' TTLs are left alone: they may now be longer than needed, never shorter, and a
-- set left empty is deleted by Redis.

local now = now_s()
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('SET', KEYS[3], '1', 'PX', ttl_ms(tonumber(ARGV[2])))
if expiry and tonumber(expiry) > now then
  return 1
end
return 0
