-- _prelude.lua: helpers shared by every script. redis_store.py prepends this file to each
-- script before loading it, so each script is still one self-contained EVALSHA.

-- Seconds since 2024-01-01 UTC, from the Redis server's clock. Server time, never the
-- client's: every replica shares one clock, so skewed replica clocks cannot hand out extra
-- tokens or expire each other's leases early. The epoch is subtracted because Lua numbers
-- are doubles: seconds since 1970 in microseconds (~1.7e15) leave little room for fractions;
-- seconds since 2024 keep about 10 ns of resolution for decades.
local EPOCH_S = 1704067200

local function now_s()
  local t = redis.call('TIME')
  return (tonumber(t[1]) - EPOCH_S) + tonumber(t[2]) / 1000000
end

-- Numbers go to Redis and back to Python as strings with all 17 significant digits: Lua's
-- tostring keeps only 14, and a number returned from a script is truncated to an integer.
local function fmt(x)
  return string.format('%.17g', x)
end

-- A key TTL in whole milliseconds, rounded up and at least 1 (PEXPIRE/PX refuse 0).
local function ttl_ms(seconds)
  local ms = math.ceil(seconds * 1000)
  if ms < 1 then
    ms = 1
  end
  return string.format('%d', ms)
end

-- A lease set lives as long as its longest lease: leases of different classes may have
-- different TTLs, so the key's TTL follows the highest score (expiry), not the latest lease.
local function expire_lease_set(key, now)
  local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if last[2] then
    redis.call('PEXPIRE', key, ttl_ms(tonumber(last[2]) - now))
  end
end

-- Unexpired leases in a set. A lease expiring exactly now no longer counts. With `prune`,
-- expired members are deleted first so the set never grows past the tenant's in-flight count
-- plus what expired since the last acquire.
local function count_leases(key, now, prune)
  if prune then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', fmt(now))
  end
  return redis.call('ZCOUNT', key, '(' .. fmt(now), '+inf')
end
