-- fleet.lua: one replica's exchange with the rest of a gateway tier (see sidecar.core.fleet):
-- say what it holds, apply its changes to the tenants' fairness counters, and read what the
-- other live replicas hold and the counters back. Each replica calls it once per refresh
-- interval; both keys share the {=fleet} tag, so on a cluster this is one call to one node.
--
-- KEYS[1]  qos:{=fleet}:waiting, a hash: field = replica id, value = "<expiry>|<summary>"
-- KEYS[2]  qos:{=fleet}:fair, a hash: field = "<rank>:<tenant>", value = counter
-- ARGV[1]  replica id
-- ARGV[2]  ttl (seconds): how long this summary counts if the replica stops exchanging
-- ARGV[3]  summary (JSON; "" when the replica holds nothing: its field is removed)
-- ARGV[4..] counter ops, three values each: field, "+" (add) or "^" (raise to), value
--
-- Returns { {replica, summary, ...} of the other live replicas, {field, counter, ...} }.

local now = now_s()
local me = ARGV[1]
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], me)
else
  redis.call('HSET', KEYS[1], me, fmt(now + tonumber(ARGV[2])) .. '|' .. ARGV[3])
end
for i = 4, #ARGV - 2, 3 do
  local field, kind, value = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  if kind == '+' then
    redis.call('HINCRBYFLOAT', KEYS[2], field, fmt(value))
  else
    local current = tonumber(redis.call('HGET', KEYS[2], field) or '0')
    if value > current then
      redis.call('HSET', KEYS[2], field, fmt(value))
    end
  end
end
local others = {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local bar = string.find(all[i + 1], '|', 1, true)
  local expiry = bar and tonumber(string.sub(all[i + 1], 1, bar - 1))
  if not expiry or expiry < now then
    redis.call('HDEL', KEYS[1], all[i])  -- a replica that stopped exchanging
  elseif all[i] ~= me then
    others[#others + 1] = all[i]
    others[#others + 1] = string.sub(all[i + 1], bar + 1)
  end
end
return { others, redis.call('HGETALL', KEYS[2]) }
