-- renew.lua: extend the leases of a tenant that the caller knows are still running.
--
-- KEYS[1]    the tenant's lease set                      qos:{tenant}:leases
-- KEYS[2..]  the tenant's lease sets of the leases' classes  qos:{tenant}:class_leases:<class>
-- ARGV[1]    the new TTL, seconds from now
-- ARGV[2..]  per lease: its id, then the index in KEYS of its class's set
--
-- Only a lease that still exists is renewed (ZADD XX): one released through another replica,
-- or expired, stays gone, so a renewal never brings a lease back.
-- Returns the ids that are gone (not renewed); the caller forgets them.

local now = now_s()
local expiry = fmt(now + tonumber(ARGV[1]))
local gone = {}
for a = 2, #ARGV, 2 do
  local id, class_key = ARGV[a], KEYS[tonumber(ARGV[a + 1])]
  local held = redis.call('ZSCORE', KEYS[1], id)
  if held and tonumber(held) > now then
    redis.call('ZADD', KEYS[1], 'XX', expiry, id)
    redis.call('ZADD', class_key, 'XX', expiry, id)
  else
    gone[#gone + 1] = id
  end
end
for i = 1, #KEYS do
  expire_lease_set(KEYS[i], now)
end
return gone
