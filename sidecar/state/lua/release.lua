-- release.lua: free leases of one tenant, and remember for a while that their ids were
-- released. One call frees many (a completion burst's worth): the script's fixed cost in the
-- server is paid once for them all, and each lease is freed on its own, as if alone.
--
-- KEYS[1]    the tenant's lease set                         qos:{tenant}:leases
-- KEYS[2]    the tenant's tombstones (sorted set, score = when each ends)  qos:{tenant}:released
-- KEYS[3..]  the lease sets of the leases' classes          qos:{tenant}:class_leases:<class>
-- ARGV[1]    how long a tombstone lives, seconds (the lease TTL)
-- ARGV[2..]  per lease: its id, the index in KEYS of its class's set
--
-- Returns per lease, in ARGV order, 1 if it was held (present and unexpired), else 0.
-- Releasing twice is safe. The tombstone makes an acquire of the same id that runs after this
-- (one the caller gave up on, run late by a stalled server) take nothing, so a release may be
-- sent for a request whether or not its acquire ran. An acquire can only be late by as long
-- as the server stalled; a tombstone as long as the lease TTL covers every stall the lease
-- itself would. The sets' TTLs are left alone: they may now be longer than needed, never
-- shorter, and a set left empty is deleted by Redis.
--
-- Tombstones are members of one set per tenant, and each call removes those that ended, not
-- keys of their own that Redis expires: a burst of releases made a burst of keys that expired
-- together a lease TTL later, and Redis's expiry cycle then stalled every command for
-- milliseconds at a time (benchmarks/README.md, "Tombstones that expire together").

local now = now_s()
local tombstone_s = tonumber(ARGV[1])
local ends = fmt(now + tombstone_s)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', fmt(now))
local held = {}
for a = 2, #ARGV, 2 do
  local id = ARGV[a]
  local expiry = redis.call('ZSCORE', KEYS[1], id)
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZREM', KEYS[tonumber(ARGV[a + 1])], id)
  redis.call('ZADD', KEYS[2], ends, id)
  if expiry and tonumber(expiry) > now then
    held[#held + 1] = 1
  else
    held[#held + 1] = 0
  end
end
-- The set lives as long as its last tombstone (calls may differ in their TTLs): an idle
-- tenant's set goes with it.
expire_lease_set(KEYS[2], now)
return held
