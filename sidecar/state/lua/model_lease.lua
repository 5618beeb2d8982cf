-- model_lease.lua: add leases to a model's lease set, or remove them. Called right after
-- acquire.lua allowed (add) or release.lua ran (remove): the model's set has its own hash tag,
-- so it may live on another shard than the tenant's keys and cannot be in their script.
-- sidecar/state/base.py says what that costs.
--
-- KEYS[1]  the model's lease set  qos:{=<model>}:model_leases (the fleet's count, gateway
--          topology) or qos:{=<model>@<pod>}:model_leases (one pod's, pod topology)
-- KEYS[2]  its tombstones (sorted set, score = when each ends)  ...:model_released
-- ARGV[1]  "add" or "remove"
-- ARGV[2]  add: the leases' TTL, seconds; ARGV[3..] their ids (those acquire.lua just added
--          for their tenants: one call adds a loop tick's admits)
-- ARGV[2]  remove: how long a tombstone lives, seconds (the lease TTL); ARGV[3..] the lease
--          ids (one call removes a completion burst's worth)
--
-- A removed id is tombstoned: an add of it that runs later (its request ended, and its end
-- reached another replica, before the admitting replica's write) adds nothing, so the entry
-- is not left counted, and renewed by its admitting replica, after its request is gone.
-- Tombstones are members of one set, pruned by each remove, as release.lua's are.
--
-- The expiry is counted from this server's clock, now: the set is only ever compared with the
-- clock of the server that holds it, which need not be the tenant's.
--
-- Or "renew": ARGV[2] the TTL, seconds; ARGV[3..] lease ids. Each that is still in the set
-- and unexpired gets the new expiry (ZADD XX: a removed entry stays removed).
--
-- Returns, for add, the model's in-flight count including the new leases; for remove, per
-- lease 1 if it was held (present and unexpired), else 0; for renew, the ids that are gone
-- (not renewed). Removing twice is safe. A lease held in no tenant set (a model-only lease,
-- sidecar/state/base.py) is released and renewed by this script alone, so its answers are
-- what the caller reports for it.

local now = now_s()
if ARGV[1] == 'add' then
  count_leases(KEYS[1], now, true) -- prune: the set holds no more than what is in flight
  local expiry = fmt(now + tonumber(ARGV[2]))
  for a = 3, #ARGV do
    local ended = redis.call('ZSCORE', KEYS[2], ARGV[a])
    if not (ended and tonumber(ended) > now) then
      redis.call('ZADD', KEYS[1], expiry, ARGV[a])
    end
  end
  expire_lease_set(KEYS[1], now)
  return redis.call('ZCARD', KEYS[1])
end
if ARGV[1] == 'renew' then
  local expiry, gone = fmt(now + tonumber(ARGV[2])), {}
  for a = 3, #ARGV do
    local held = redis.call('ZSCORE', KEYS[1], ARGV[a])
    if held and tonumber(held) > now then
      redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[a])
    else
      gone[#gone + 1] = ARGV[a]
    end
  end
  expire_lease_set(KEYS[1], now)
  return gone
end
local held, ends = {}, fmt(now + tonumber(ARGV[2]))
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', fmt(now))
for a = 3, #ARGV do
  local expiry = redis.call('ZSCORE', KEYS[1], ARGV[a])
  redis.call('ZREM', KEYS[1], ARGV[a])
  redis.call('ZADD', KEYS[2], ends, ARGV[a])
  held[#held + 1] = (expiry and tonumber(expiry) > now) and 1 or 0
end
expire_lease_set(KEYS[2], now)
return held
