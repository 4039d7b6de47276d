-- Reserve tokens against every budget that applies to a request, atomically.
-- KEYS[i]: counter hash of budget i (fields: used, reserved, r:<request id>); KEYS[i]..':exp' is its
--          sorted set of reservation expiries. All keys share one hash tag (one Cluster slot).
-- ARGV: request_id, now_ms, expires_at_ms, prompt_estimate, wanted, then limit_i for each key,
--       then key_expire_at_s for each key.
-- Returns {1, granted, used_1, reserved_1, ...}     reserved (granted <= wanted)
--         {0, i, used_i, reserved_i, limit_i}        refused: budget i has no room for the prompt
--         {-1, i}                                    budget i's counter is missing: rebuild, then retry
local n = #KEYS
local rid, now = ARGV[1], tonumber(ARGV[2])
local expires_at, prompt, grant = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])

for i = 1, n do
  if redis.call('HEXISTS', KEYS[i], 'used') == 0 then return {-1, i} end
end

local state = {}
for i = 1, n do
  local key, zkey = KEYS[i], KEYS[i] .. ':exp'
  -- Reservations of requests that never settled (a crashed instance) lapse here.
  local lapsed = redis.call('ZRANGEBYSCORE', zkey, '-inf', now)
  if #lapsed > 0 then
    for _, id in ipairs(lapsed) do
      local amount = redis.call('HGET', key, 'r:' .. id)
      if amount then
        redis.call('HDEL', key, 'r:' .. id)
        redis.call('HINCRBY', key, 'reserved', -tonumber(amount))
      end
    end
    redis.call('ZREMRANGEBYSCORE', zkey, '-inf', now)
  end
  local used = tonumber(redis.call('HGET', key, 'used'))
  local reserved = tonumber(redis.call('HGET', key, 'reserved') or '0')
  local limit = tonumber(ARGV[5 + i])
  local room = limit - used - reserved
  if room <= prompt then return {0, i, used, reserved, limit} end
  if room < grant then grant = room end
  state[2 * i - 1], state[2 * i] = used, reserved
end

local out = {1, grant}
for i = 1, n do
  local key, zkey = KEYS[i], KEYS[i] .. ':exp'
  redis.call('HSET', key, 'r:' .. rid, grant)
  redis.call('HINCRBY', key, 'reserved', grant)
  redis.call('ZADD', zkey, expires_at, rid)
  redis.call('EXPIREAT', zkey, tonumber(ARGV[5 + n + i]))
  out[#out + 1] = state[2 * i - 1]
  out[#out + 1] = state[2 * i] + grant
end
return out
