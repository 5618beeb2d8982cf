-- release.lua: free leases of one tenant, and remember for a while that their ids were
-- released. One call frees many (a completion burst's worth): the script's fixed cost in the
-- server is paid once for them all, and each lease is freed on its own, as if alone.
--
-- KEYS[1]    the tenant's lease set                         qos:{tenant}:leases
-- KEYS[2..]  the lease sets of the leases' classes, and each lease's tombstone
--            qos:{tenant}:class_leases:<class>, qos:{tenant}:released:<lease id>
-- ARGV[1]    how long a tombstone lives, seconds (the lease TTL)
-- ARGV[2..]  per lease: its id, the index in KEYS of its class's set, of its tombstone
--
-- Returns per lease, in ARGV order, 1 if it was held (present and unexpired), else 0.
-- Releasing twice is safe. The tombstone makes an acquire of the same id that runs after this
-- (one the caller gave up on, run late by a stalled server) take nothing, so a release may be
-- sent for a request whether or not its acquire ran. An acquire can only be late by as long
-- as the server stalled; a tombstone as long as the lease TTL covers every stall the lease
-- itself would. The sets' TTLs are left alone: they may now be longer than needed, never
-- shorter, and a set left empty is deleted by Redis.

local now = now_s()
local tombstone_ms = ttl_ms(tonumber(ARGV[1]))
local held = {}
for a = 2, #ARGV, 3 do
  local id = ARGV[a]
  local expiry = redis.call('ZSCORE', KEYS[1], id)
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZREM', KEYS[tonumber(ARGV[a + 1])], id)
  redis.call('SET', KEYS[tonumber(ARGV[a + 2])], '1', 'PX', tombstone_ms)
  if expiry and tonumber(expiry) > now then
    held[#held + 1] = 1
  else
    held[#held + 1] = 0
  end
end
return held
