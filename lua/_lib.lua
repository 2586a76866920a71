--[[
  Shared helpers, inlined by the loader (engine/scripts.py) where a script says
  `--- @include "_lib"`. Not a script of its own.

  Rules every script follows:
  - every check happens before the first write (Redis scripts do not roll back);
  - amounts are integers far below 2^53 (engine/limits.py bounds them), so double arithmetic
    is exact; numbers are turned into strings with istr(), never tostring() (which would print
    1e+15);
  - the clock is Redis TIME unless the caller passes a positive now_ms (tests only);
  - a script that changes balance_pence or debt_pence appends the ledger entry to the org's
    outbox stream in the same call.
]]
local rcall = redis.call

local IDEM_PRUNE_MAX = 8

local function istr(n)
  return string.format('%d', n)
end

local function int_arg(value, name, min, max)
  local n = tonumber(value)
  if n == nil or n ~= math.floor(n) or n < min or n > max then
    error('bad argument ' .. name .. ': ' .. tostring(value))
  end
  return n
end

local function clock_ms(override_arg)
  local override = int_arg(override_arg, 'now_ms', 0, 9007199254740991)
  if override > 0 then
    return override
  end
  local t = rcall('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Org state ---------------------------------------------------------------------------------

local ORG_FIELDS = {
  'balance_pence', 'held_pence', 'debt_pence', 'seq',
  'rate_pence_per_minute', 'overdraft_pence', 'min_start_pence',
  'hold_block_minutes', 'grace_seconds', 'max_concurrent_calls',
}

local function org_load(key)
  local values = rcall('HMGET', key, unpack(ORG_FIELDS))
  if values[1] == false then
    return nil
  end
  local org = {}
  for i, field in ipairs(ORG_FIELDS) do
    org[field] = tonumber(values[i]) or 0
  end
  return org
end

-- Writes the money fields back and bumps seq, the org's change counter.
local function org_save_money(key, org)
  org.seq = org.seq + 1
  rcall('HSET', key,
    'balance_pence', istr(org.balance_pence), 'held_pence', istr(org.held_pence),
    'debt_pence', istr(org.debt_pence), 'seq', istr(org.seq))
end

-- {code, balance_pence, held_pence, available_pence, debt_pence, seq}
local function head(code, org)
  if org == nil then
    return {code, 0, 0, 0, 0, 0}
  end
  return {code, org.balance_pence, org.held_pence, org.balance_pence - org.held_pence,
          org.debt_pence, org.seq}
end

local function with_tail(result, tail)
  for _, v in ipairs(tail) do
    result[#result + 1] = v
  end
  return result
end

-- Money arithmetic (mirrored by engine/amounts.py) ------------------------------------------

local function billed_seconds_from_ms(duration_ms)
  if duration_ms <= 0 then
    return 0
  end
  return math.floor((duration_ms + 999) / 1000)
end

-- Rounded up to a whole penny per call.
local function cost_pence(billed_seconds, rate_pence_per_minute)
  return math.floor((billed_seconds * rate_pence_per_minute + 59) / 60)
end

-- Charges cost in full: the balance goes down to the overdraft floor, the rest becomes debt.
-- Returns balance_pence_after, debt_delta_pence.
local function charge_with_floor(balance_pence, overdraft_pence, cost)
  local floor_pence = -overdraft_pence
  if balance_pence < floor_pence then
    floor_pence = balance_pence
  end
  local after = balance_pence - cost
  if after < floor_pence then
    after = floor_pence
  end
  return after, cost - (balance_pence - after)
end

-- Credits amount, paying off debt first. Returns balance_pence_after, debt_delta_pence (<= 0).
local function credit_with_repay(balance_pence, debt_pence, amount)
  local repay = amount
  if debt_pence < repay then
    repay = debt_pence
  end
  return balance_pence + amount - repay, -repay
end

-- Charges cost to the org (in place) with the overdraft floor. Returns amount, debt_delta: the
-- changes to balance_pence and debt_pence that the ledger entry records.
local function org_charge(org, cost)
  local balance_after, debt_delta = charge_with_floor(org.balance_pence, org.overdraft_pence, cost)
  local amount = balance_after - org.balance_pence
  org.balance_pence = balance_after
  org.debt_pence = org.debt_pence + debt_delta
  return amount, debt_delta
end

-- Credits amount to the org (in place), paying off debt first. Returns amount, debt_delta.
local function org_credit(org, amount)
  local balance_after, debt_delta = credit_with_repay(org.balance_pence, org.debt_pence, amount)
  local balance_delta = balance_after - org.balance_pence
  org.balance_pence = balance_after
  org.debt_pence = org.debt_pence + debt_delta
  return balance_delta, debt_delta
end

-- Idempotency records -----------------------------------------------------------------------

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

-- Hold records:
-- "hold_pence|rate|created_ms|started_ms|last_seen_ms|expires_ms|max_duration_s|version|ended_ms"
-- started_ms and ended_ms are 0 until the call starts / ends.

local function hold_decode(text)
  local p, r, c, s, l, e, d, v, x = string.match(text,
    '^(%d+)|(%d+)|(%d+)|(%d+)|(%d+)|(%d+)|(%d+)|(%d+)|(%d+)$')
  if p == nil then
    error('corrupt hold record: ' .. text)
  end
  return {
    hold_pence = tonumber(p), rate = tonumber(r), created_ms = tonumber(c),
    started_ms = tonumber(s), last_seen_ms = tonumber(l), expires_ms = tonumber(e),
    max_duration_s = tonumber(d), version = tonumber(v), ended_ms = tonumber(x),
  }
end

local function hold_encode(h)
  return table.concat({
    istr(h.hold_pence), istr(h.rate), istr(h.created_ms), istr(h.started_ms),
    istr(h.last_seen_ms), istr(h.expires_ms), istr(h.max_duration_s), istr(h.version),
    istr(h.ended_ms),
  }, '|')
end

-- The last moment a call is known to have run: its end if it ended, else when last seen.
local function hold_known_until_ms(h)
  if h.ended_ms > 0 then
    return h.ended_ms
  end
  return h.last_seen_ms
end

-- Call resolution records: "status|charged_pence|billed_seconds|rate"

local function call_state_decode(text)
  local status, charged, billed, rate = string.match(text, '^(%a+)|(%d+)|(%d+)|(%d+)$')
  if status == nil then
    error('corrupt call state record: ' .. text)
  end
  return {status = status, charged_pence = tonumber(charged),
          billed_seconds = tonumber(billed), rate = tonumber(rate)}
end

local function call_state_encode(status, charged, billed, rate)
  return status .. '|' .. istr(charged) .. '|' .. istr(billed) .. '|' .. istr(rate)
end

-- Outbox -------------------------------------------------------------------------------------

local function outbox_has_room(stream, outbox_max)
  return rcall('XLEN', stream) < outbox_max
end

-- A ledger entry. amount is the change to balance_pence, debt_delta the change to debt_pence.
local function outbox_ledger(stream, org_id, org, e, now_ms)
  rcall('XADD', stream, '*',
    't', 'L', 'o', org_id, 'k', e.key, 'kind', e.kind,
    'a', istr(e.amount), 'dd', istr(e.debt_delta),
    'b', istr(org.balance_pence), 'db', istr(org.debt_pence),
    'c', e.call_id or '', 'bs', istr(e.billed_seconds or 0), 'r', istr(e.rate or 0),
    'fp', e.fingerprint or '', 'm', e.meta or '',
    'ms', istr(now_ms), 's', istr(org.seq))
end

-- A hold event: the call's hold as it now stands, for the Postgres call_holds table.
local function outbox_hold(stream, org_id, org, call_id, status, h, charged, billed, now_ms)
  rcall('XADD', stream, '*',
    't', 'H', 'o', org_id, 'c', call_id, 'st', status, 'h', hold_encode(h),
    'ch', istr(charged), 'bs', istr(billed), 'ms', istr(now_ms), 's', istr(org.seq))
end
