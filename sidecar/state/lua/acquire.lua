-- acquire.lua: check every limit of one request and, only if all of them allow, take them:
-- charge every bucket and add a lease. In "peek" mode, answer the same and write nothing.
-- The rules are in sidecar/state/base.py; the bucket arithmetic mirrors sidecar/core/gcra.py.
--
-- KEYS[1]    the tenant's lease set                qos:{tenant}:leases
-- KEYS[2]    the tenant's lease set for the class  qos:{tenant}:class_leases:<class>
-- KEYS[3]    the lease id's tombstone               qos:{tenant}:released:<lease id>
-- KEYS[4..]  one bucket per check                  qos:{tenant}:bucket:<name>
-- ARGV[1]    "acquire", "peek", or "charge" (the buckets only: no lease, no tombstone read,
--            and the caller sends no concurrency limit; leased mode's slices)
-- ARGV[2]    the new lease id: the request's id, or random (made by the client; ignored by
--            peek)
-- ARGV[3]    lease TTL, seconds
-- ARGV[4]    max in-flight for the tenant, or "" for no limit
-- ARGV[5]    max in-flight for the tenant and class, or "" for no limit
-- ARGV[6..]  per bucket, in KEYS order: rate_per_s, burst, cost
--
-- Returns {allowed 1|0, denied_by 0 none|1 class concurrency|2 concurrency|3 bucket|
--          4 lease id held or released already,
--          denied bucket (1-based index into the buckets, 0 for none),
--          retry_after_s (string), in_flight, class_in_flight}

-- Forgive this much rounding (seconds) when a cost exactly fills a bucket: the stored TAT is
-- rounded to about 10 ns each time it moves, and an exact fit must not be denied for that.
local EPSILON_S = 1e-6

local take = ARGV[1] ~= 'peek'
local lease = ARGV[1] == 'acquire'
local now = now_s()

local in_flight = count_leases(KEYS[1], now, take)
local class_in_flight = count_leases(KEYS[2], now, take)

local function denied(code, index, retry_after_s)
  return {0, code, index, fmt(retry_after_s), in_flight, class_in_flight}
end

-- A released id takes nothing: this acquire ran after its request's release (Redis ran it
-- late, after the caller gave up on it) and must not leave a lease nobody will release. A
-- held id is another request reusing a running request's id: it gets no lease of its own.
if lease then
  local held = redis.call('ZSCORE', KEYS[1], ARGV[2])
  if redis.call('EXISTS', KEYS[3]) == 1 or (held and tonumber(held) > now) then
    return denied(4, 0, 0)
  end
end
if ARGV[5] ~= '' and class_in_flight >= tonumber(ARGV[5]) then
  return denied(1, 0, 0)
end
if ARGV[4] ~= '' and in_flight >= tonumber(ARGV[4]) then
  return denied(2, 0, 0)
end

-- Evaluate every bucket before charging any: all or nothing.
local new_tats = {}
local worst_index, worst_retry = 0, -1
for i = 4, #KEYS do
  local a = 6 + (i - 4) * 3
  local rate, burst, cost = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  if cost > 0 then
    local stored = redis.call('GET', KEYS[i])
    local tat = now
    if stored then
      tat = math.max(tonumber(stored), now)
    end
    local tolerance = burst / rate
    local retry_after = nil
    if cost > burst then
      retry_after = tolerance -- never fits; report a full refill (see base.py)
    else
      local new_tat = tat + cost / rate
      local excess = new_tat - now - tolerance
      if excess <= EPSILON_S then
        new_tats[i] = new_tat
      else
        retry_after = excess
      end
    end
    if retry_after and retry_after > worst_retry then
      worst_index, worst_retry = i - 3, retry_after
    end
  end
end
if worst_index > 0 then
  return denied(3, worst_index, worst_retry)
end
if not take then
  return {1, 0, 0, '0', in_flight, class_in_flight}
end

for i, new_tat in pairs(new_tats) do
  -- The key expires when the bucket is full again: a missing key reads as a full bucket, so
  -- idle tenants leave nothing behind.
  redis.call('SET', KEYS[i], fmt(new_tat), 'PX', ttl_ms(new_tat - now))
end
if not lease then
  return {1, 0, 0, '0', in_flight, class_in_flight}
end
local expiry = fmt(now + tonumber(ARGV[3]))
redis.call('ZADD', KEYS[1], expiry, ARGV[2])
redis.call('ZADD', KEYS[2], expiry, ARGV[2])
expire_lease_set(KEYS[1], now)
expire_lease_set(KEYS[2], now)
return {1, 0, 0, '0', in_flight + 1, class_in_flight + 1}
