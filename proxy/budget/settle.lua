-- Replace a request's reservation with its real usage, on every budget it was reserved against.
-- KEYS[1..n]: counter hashes (as in reserve.lua); KEYS[n+1], if present: the user's rate hash.
-- ARGV: request_id, tokens_used, n, now_ms[, ledgered_ms].
-- A counter that vanished since the reservation (Redis flushed) is left alone: it is rebuilt from
-- PostgreSQL, which will hold this request's ledger record, so counting it here would count it twice.
-- So is one rebuilt (its `built`, ms) after this request's record went into PostgreSQL (ledgered_ms, for
-- an owed settle whose record was written there directly): the rebuild counted it.
-- Returns the settled `used` of each counter (-1 where it was missing or rebuilt).
local rid, tokens, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local ledgered = tonumber(ARGV[5] or '0')
local out = {}
for i = 1, n do
  local key = KEYS[i]
  if redis.call('HEXISTS', key, 'used') == 0 then
    out[i] = -1
  elseif ledgered > 0 and tonumber(redis.call('HGET', key, 'built') or '0') >= ledgered then
    out[i] = -1
  else
    local amount = redis.call('HGET', key, 'r:' .. rid)
    if amount then
      redis.call('HDEL', key, 'r:' .. rid)
      redis.call('HINCRBY', key, 'reserved', -tonumber(amount))
      redis.call('ZREM', key .. ':exp', rid)
    end
    out[i] = redis.call('HINCRBY', key, 'used', tokens)
  end
end
local rate = KEYS[n + 1]
if rate and tokens > 0 then
  redis.call('HINCRBY', rate, 't:' .. math.floor(tonumber(ARGV[4]) / 60000), tokens)
  redis.call('PEXPIRE', rate, 180000)
end
return out
