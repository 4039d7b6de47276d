-- Reserve tokens against every budget that applies to a request, and check its rate limits, atomically.
-- KEYS[1..n]: counter hash of each budget (fields: used, reserved, r:<request id>); KEYS[i]..':exp' is
--             its sorted set of reservation expiries.
-- KEYS[n+1]:  (only when rpm or tpm is set) the user's rate hash: q:<minute> requests, t:<minute> tokens.
-- All keys share one hash tag, so this runs unchanged on Redis Cluster.
-- ARGV: request_id, now_ms, expires_at_ms, prompt_estimate, wanted, n, limit_1..limit_n,
--       key_expire_at_s_1..n, rpm, tpm (0 = no limit), holdback
-- A request that wants more than a budget's room gets the room less a holdback for requests that
-- arrive with it (LibreChat sends a chat and its title at once): half of what the room holds past the
-- prompt, at most `holdback` tokens. Never more than the room: the hard bound stands.
-- Returns {1, granted, requests_in_window, tokens_in_window, used_1, reserved_1, ...}
--         {0, i, used_i, reserved_i, limit_i}           refused: budget i has no room for the prompt
--         {-1, i}                                       budget i's counter is missing: rebuild, then retry
--         {2, kind, retry_after_ms, in_window}          rate limited (kind 1: requests, 2: tokens)
local rid, now = ARGV[1], tonumber(ARGV[2])
local expires_at, prompt, grant = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local n = tonumber(ARGV[6])
local rpm, tpm = tonumber(ARGV[7 + 2 * n]), tonumber(ARGV[8 + 2 * n])
local holdback = tonumber(ARGV[9 + 2 * n] or '0')
local wanted = grant

for i = 1, n do
  if redis.call('HEXISTS', KEYS[i], 'used') == 0 then return {-1, i} end
end

-- Sliding window over the current and the previous minute, the previous weighted by how much of
-- it still lies inside the last 60 seconds.
local in_requests, in_tokens = 0, 0
local minute, weight, rate = 0, 0, nil
if rpm > 0 or tpm > 0 then
  rate = KEYS[n + 1]
  minute = math.floor(now / 60000)
  weight = 1 - (now % 60000) / 60000
  local f = redis.call('HMGET', rate, 'q:' .. minute, 'q:' .. (minute - 1), 't:' .. minute, 't:' .. (minute - 1))
  local q, pq, t, pt = tonumber(f[1] or '0'), tonumber(f[2] or '0'), tonumber(f[3] or '0'), tonumber(f[4] or '0')
  in_requests = math.floor(pq * weight + q)
  in_tokens = math.floor(pt * weight + t)
  local function retry_after(prev, cur, limit, need)
    -- ms until prev * weight' + cur + need <= limit, or the next minute when the current one is full
    if cur + need > limit or prev == 0 then return 60000 - now % 60000 end
    local w = (limit - cur - need) / prev
    return math.max(math.ceil((weight - w) * 60000), 1)
  end
  if rpm > 0 and pq * weight + q + 1 > rpm then return {2, 1, retry_after(pq, q, rpm, 1), in_requests} end
  if tpm > 0 and pt * weight + t >= tpm then return {2, 2, retry_after(pt, t, tpm, 1), in_tokens} end
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
  local limit = tonumber(ARGV[6 + i])
  local room = limit - used - reserved
  if room <= prompt then return {0, i, used, reserved, limit} end
  local fits = room
  if room < wanted then fits = room - math.min(math.floor((room - prompt) / 2), holdback) end
  if fits < grant then grant = fits end
  state[2 * i - 1], state[2 * i] = used, reserved
end

local out = {1, grant, in_requests, in_tokens}
for i = 1, n do
  local key, zkey = KEYS[i], KEYS[i] .. ':exp'
  redis.call('HSET', key, 'r:' .. rid, grant)
  redis.call('HINCRBY', key, 'reserved', grant)
  redis.call('ZADD', zkey, expires_at, rid)
  redis.call('EXPIREAT', zkey, tonumber(ARGV[6 + n + i]))
  out[#out + 1] = state[2 * i - 1]
  out[#out + 1] = state[2 * i] + grant
end
if rate then
  redis.call('HINCRBY', rate, 'q:' .. minute, 1)
  redis.call('HDEL', rate, 'q:' .. (minute - 2), 't:' .. (minute - 2))
  redis.call('PEXPIRE', rate, 180000)
end
return out
