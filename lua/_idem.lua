--[[
  Idempotency records: a hash of results by key, with an expiry index pruned a few at a time.
]]
--- @include "_base"

local IDEM_PRUNE_MAX = 8

local function idem_prune(idem_key, exp_key, now_ms)
  local expired = rcall('ZRANGEBYSCORE', exp_key, '-inf', istr(now_ms), 'LIMIT', 0, IDEM_PRUNE_MAX)
  if #expired > 0 then
    rcall('HDEL', idem_key, unpack(expired))
    rcall('ZREM', exp_key, unpack(expired))
  end
end

local function idem_get(idem_key, field)
  local value = rcall('HGET', idem_key, field)
  if value == false then
    return nil
  end
  return value
end

local function idem_put(idem_key, exp_key, field, value, expires_ms)
  rcall('HSET', idem_key, field, value)
  rcall('ZADD', exp_key, istr(expires_ms), field)
end
