-- release.lua: free one lease.
--
-- KEYS[1]  the tenant's lease set                qos:{tenant}:leases
-- KEYS[2]  the tenant's lease set for the class  qos:{tenant}:class_leases:<class>
-- ARGV[1]  the lease id
--
-- Returns 1 if the lease was held (present and unexpired), else 0. Releasing twice is safe.
-- The sets' TTLs are left alone: they may now be longer than needed, never shorter, and a
-- set left empty is deleted by Redis.

local now = now_s()
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if expiry and tonumber(expiry) > now then
  return 1
end
return 0
