-- acquire.lua: check every limit of each of a tenant's requests and, only where all of them
-- allow, take them: charge every bucket and add a lease. In "peek" mode, answer the same and
-- write nothing. The rules are in sidecar/state/base.py; the bucket arithmetic mirrors
-- sidecar/core/gcra.py.
--
-- One call judges one request or many (the acquires of one event-loop tick, batched by the
-- store). They are judged one after the other at one `now`, each all or nothing, each seeing
-- what those before it took: exactly as if each had been a call of its own. Counts, lease
-- ids taken and buckets are kept here as they move and written once at the end, so that
-- what a call costs the server beyond each request's own reads (the clock, pruning, counting,
-- the bucket writes, the sets' TTLs) is paid once per call, not once per request.
--
-- KEYS[1]    the tenant's lease set                qos:{tenant}:leases
-- KEYS[2]    the tenant's tombstones (sorted set, score = when each ends)  qos:{tenant}:released
-- KEYS[3..]  per request: the lease set of its class  qos:{tenant}:class_leases:<class>,
--            then one bucket per check                qos:{tenant}:bucket:<name>
-- ARGV[1]    "acquire", "peek", or "charge" (the buckets only: no lease, no tombstone read,
--            and the caller sends no concurrency limit; leased mode's slices)
-- ARGV[2..]  per request: the new lease id (the request's id, or random, made by the client;
--            ignored by peek), lease TTL in seconds, max in-flight for the tenant or "" for
--            no limit, max in-flight for the tenant and class or "", the number of buckets n,
--            then per bucket, in KEYS order: rate_per_s, burst, cost
--
-- Returns per request, in order: {allowed 1|0, denied_by 0 none|1 class concurrency|
--          2 concurrency|3 bucket|4 lease id held or released already,
--          denied bucket (1-based index into its buckets, 0 for none),
--          retry_after_s (string), in_flight, class_in_flight}

-- Forgive this much rounding (seconds) when a cost exactly fills a bucket: the stored TAT is
-- rounded to about 10 ns each time it moves, and an exact fit must not be denied for that.
local EPSILON_S = 1e-6

local take = ARGV[1] ~= 'peek'
local lease = ARGV[1] == 'acquire'
local now = now_s()

local counts = {} -- lease set -> its unexpired leases, those taken by this call included
local function count_of(key)
  local n = counts[key]
  if n == nil then
    n = count_leases(key, now, take)
    counts[key] = n
  end
  return n
end

local tats = {} -- bucket -> its TAT, as the requests before this one left it
local function tat_of(key)
  local tat = tats[key]
  if tat == nil then
    local stored = redis.call('GET', key)
    tat = now
    if stored then
      tat = math.max(tonumber(stored), now)
    end
    tats[key] = tat
  end
  return tat
end

local charged, charged_order = {}, {} -- buckets to write at the end, in first-charge order
local added, added_order = {}, {} -- lease set -> {score, id, ...} for one ZADD at the end
local taken = {} -- lease ids this call took

local function add_lease(key, expiry, id)
  local members = added[key]
  if members == nil then
    members = {}
    added[key] = members
    added_order[#added_order + 1] = key
  end
  members[#members + 1] = expiry
  members[#members + 1] = id
end

-- Which bucket of the request denies it, and after how long it would not (0, -1: none).
local function worst_bucket(k, a, n, new_tats)
  local worst_index, worst_retry = 0, -1
  for j = 0, n - 1 do
    local key = KEYS[k + 1 + j]
    local b = a + 5 + 3 * j
    local rate, burst, cost = tonumber(ARGV[b]), tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2])
    if cost > 0 then
      local tolerance = burst / rate
      local retry_after = nil
      if cost > burst then
        retry_after = tolerance -- never fits; report a full refill (see base.py)
      else
        local new_tat = tat_of(key) + cost / rate
        local excess = new_tat - now - tolerance
        if excess <= EPSILON_S then
          new_tats[key] = new_tat
        else
          retry_after = excess
        end
      end
      if retry_after and retry_after > worst_retry then
        worst_index, worst_retry = j + 1, retry_after
      end
    end
  end
  return worst_index, worst_retry
end

-- The request whose keys start at KEYS[k] and whose arguments start at ARGV[a].
local function judge(k, a, n)
  local class_key, id = KEYS[k], ARGV[a]
  local in_flight, class_in_flight = count_of(KEYS[1]), count_of(class_key)
  local function denied(code, index, retry_after_s)
    return {0, code, index, fmt(retry_after_s), in_flight, class_in_flight}
  end
  -- A released id takes nothing: this acquire ran after its request's release (Redis ran it
  -- late, after the caller gave up on it) and must not leave a lease nobody will release. A
  -- held id is another request reusing a running request's id: it gets no lease of its own.
  if lease then
    if taken[id] then
      return denied(4, 0, 0)
    end
    local held = redis.call('ZSCORE', KEYS[1], id)
    local released = redis.call('ZSCORE', KEYS[2], id)
    if (released and tonumber(released) > now) or (held and tonumber(held) > now) then
      return denied(4, 0, 0)
    end
  end
  if ARGV[a + 3] ~= '' and class_in_flight >= tonumber(ARGV[a + 3]) then
    return denied(1, 0, 0)
  end
  if ARGV[a + 2] ~= '' and in_flight >= tonumber(ARGV[a + 2]) then
    return denied(2, 0, 0)
  end
  -- Evaluate every bucket before charging any: all or nothing.
  local new_tats = {}
  local worst_index, worst_retry = worst_bucket(k, a, n, new_tats)
  if worst_index > 0 then
    return denied(3, worst_index, worst_retry)
  end
  if not take then
    return {1, 0, 0, '0', in_flight, class_in_flight}
  end
  for key, new_tat in pairs(new_tats) do
    tats[key] = new_tat
    if not charged[key] then
      charged[key] = true
      charged_order[#charged_order + 1] = key
    end
  end
  if not lease then
    return {1, 0, 0, '0', in_flight, class_in_flight}
  end
  local expiry = fmt(now + tonumber(ARGV[a + 1]))
  add_lease(KEYS[1], expiry, id)
  add_lease(class_key, expiry, id)
  taken[id] = true
  counts[KEYS[1]], counts[class_key] = in_flight + 1, class_in_flight + 1
  return {1, 0, 0, '0', in_flight + 1, class_in_flight + 1}
end

local replies = {}
local k, a = 3, 2
while a <= #ARGV do
  local n = tonumber(ARGV[a + 4])
  replies[#replies + 1] = judge(k, a, n)
  k, a = k + 1 + n, a + 5 + 3 * n
end

for _, key in ipairs(charged_order) do
  -- The key expires when the bucket is full again: a missing key reads as a full bucket, so
  -- idle tenants leave nothing behind.
  local tat = tats[key]
  redis.call('SET', key, fmt(tat), 'PX', ttl_ms(tat - now))
end
for _, key in ipairs(added_order) do
  redis.call('ZADD', key, unpack(added[key]))
  expire_lease_set(key, now)
end
return replies
