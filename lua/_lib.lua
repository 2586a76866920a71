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
    outbox stream in the same call;
  - every reply starts with head(): {code, balance, held, available, debt, seq, depletion_ms},
    where depletion_ms is the org's predicted depletion moment when this script moved it (the
    caller files it in the kill switch's schedule), else 0.
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
  'burn_rate', 'burn_k', 'burn_at_s', 'burn_frozen_pence',
  'low_balance_threshold_pence', 'alert_low_sent', 'alert_exhausted_sent', 'epoch',
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

-- Burn: how fast the org's live calls spend, for the kill switch's depletion prediction.
-- A live call burns its rate from its start (from its reservation until it is known to have
-- started, so the prediction errs early) until it ends; an ended call's cost is frozen until
-- its report commits it. Kept as running sums in whole seconds, so each event costs O(1):
--   burn_rate          R: the sum of the rates of the calls burning now (pence per minute)
--   burn_k             K: the sum over those calls of rate * (burn_at_s - the second it began)
--   burn_at_s          A: the second K was last brought up to date
--   burn_frozen_pence  E: the cost of ended calls that are not committed yet
-- By second t the calls have spent (K + R * (t - A)) / 60 + E pence, and the org's credit runs
-- out when that reaches balance_pence. All integers, all far below 2^53.

local function burn_advance(org, now_ms)
  local now_s = math.floor(now_ms / 1000)
  if now_s > org.burn_at_s then
    org.burn_k = org.burn_k + org.burn_rate * (now_s - org.burn_at_s)
    org.burn_at_s = now_s
  end
end

-- The predicted depletion moment (ms), 0 when no call is burning. May be in the past.
local function burn_deadline_ms(org)
  if org.burn_rate <= 0 then
    return 0
  end
  local x = math.ceil((60 * (org.balance_pence - org.burn_frozen_pence) - org.burn_k) / org.burn_rate)
  return math.max(1, (org.burn_at_s + x) * 1000)
end

-- Writes the money fields back and bumps seq, the org's change counter.
local function org_save_money(key, org)
  org.seq = org.seq + 1
  org.deadline_moved = true
  rcall('HSET', key,
    'balance_pence', istr(org.balance_pence), 'held_pence', istr(org.held_pence),
    'debt_pence', istr(org.debt_pence), 'seq', istr(org.seq))
  if org.burn_changed then
    rcall('HSET', key,
      'burn_rate', istr(org.burn_rate), 'burn_k', istr(org.burn_k),
      'burn_at_s', istr(org.burn_at_s), 'burn_frozen_pence', istr(org.burn_frozen_pence))
  end
end

-- {code, balance_pence, held_pence, available_pence, debt_pence, seq, depletion_ms}
local function head(code, org)
  if org == nil then
    return {code, 0, 0, 0, 0, 0, 0}
  end
  local depletion_ms = 0
  if org.deadline_moved then
    depletion_ms = burn_deadline_ms(org)
  end
  return {code, org.balance_pence, org.held_pence, org.balance_pence - org.held_pence,
          org.debt_pence, org.seq, depletion_ms}
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

-- The second from which a hold's call burns: its start, else its reservation.
local function hold_burn_from_s(h)
  if h.started_ms > 0 then
    return math.floor(h.started_ms / 1000)
  end
  return math.floor(h.created_ms / 1000)
end

-- What an ended call has cost (its clock is stopped); 0 if it never started.
local function hold_frozen_pence(h)
  if h.started_ms == 0 or h.ended_ms <= h.started_ms then
    return 0
  end
  return cost_pence(billed_seconds_from_ms(h.ended_ms - h.started_ms), h.rate)
end

-- A call begins to burn (a reservation, a restored hold).
local function burn_add(org, h, now_ms)
  burn_advance(org, now_ms)
  if h.ended_ms > 0 then
    org.burn_frozen_pence = org.burn_frozen_pence + hold_frozen_pence(h)
  else
    org.burn_rate = org.burn_rate + h.rate
    org.burn_k = org.burn_k + h.rate * (org.burn_at_s - hold_burn_from_s(h))
  end
  org.burn_changed = true
end

-- A hold goes away (commit, release, expiry): it stops counting, whatever state it was in.
local function burn_remove(org, h, now_ms)
  burn_advance(org, now_ms)
  if h.ended_ms > 0 then
    org.burn_frozen_pence = org.burn_frozen_pence - hold_frozen_pence(h)
  else
    org.burn_rate = org.burn_rate - h.rate
    org.burn_k = org.burn_k - h.rate * (org.burn_at_s - hold_burn_from_s(h))
  end
  org.burn_changed = true
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

-- The key of a balance alert: once per change of the org. seq starts again at 1 when a lost org
-- is rebuilt from Postgres, so the key carries the restore's epoch too (a later crossing's alert
-- must not be taken for an earlier one's and dropped as a duplicate).
local function balance_alert_key(org_id, kind, epoch, seq)
  return 'alert:' .. org_id .. ':' .. kind .. ':' .. istr(epoch) .. '.' .. istr(seq)
end

-- An alert for the org's webhook (delivered by the worker from Postgres's alert_events). Its key
-- makes it once per call for a call's alert, once per change for a balance alert.
local function outbox_alert(stream, org_id, org, kind, call_id, now_ms)
  local key = 'alert:' .. org_id .. ':' .. kind .. ':' .. (call_id or '')
  if call_id == nil then
    key = balance_alert_key(org_id, kind, org.epoch, org.seq)
  end
  rcall('XADD', stream, '*',
    't', 'A', 'o', org_id, 'k', key,
    'kind', kind, 'c', call_id or '',
    'b', istr(org.balance_pence), 'av', istr(org.balance_pence - org.held_pence),
    'th', istr(org.low_balance_threshold_pence), 'ms', istr(now_ms), 's', istr(org.seq))
end

-- After a debit or a hold: one alert per downward crossing of the low-balance threshold and
-- of zero. Only a credit re-arms them (alerts_rearm), so a balance hovering at the threshold as
-- holds come and go does not flap.
local function alerts_after_debit(key, stream, org_id, org, now_ms)
  local available = org.balance_pence - org.held_pence
  if org.low_balance_threshold_pence > 0 and org.alert_low_sent == 0
      and available < org.low_balance_threshold_pence then
    org.alert_low_sent = 1
    rcall('HSET', key, 'alert_low_sent', '1')
    outbox_alert(stream, org_id, org, 'low_balance', nil, now_ms)
  end
  if org.alert_exhausted_sent == 0 and available <= 0 then
    org.alert_exhausted_sent = 1
    rcall('HSET', key, 'alert_exhausted_sent', '1')
    outbox_alert(stream, org_id, org, 'balance_exhausted', nil, now_ms)
  end
end

local function alerts_rearm(key, org)
  local available = org.balance_pence - org.held_pence
  if org.alert_low_sent == 1 and available >= org.low_balance_threshold_pence then
    org.alert_low_sent = 0
    rcall('HSET', key, 'alert_low_sent', '0')
  end
  if org.alert_exhausted_sent == 1 and available > 0 then
    org.alert_exhausted_sent = 0
    rcall('HSET', key, 'alert_exhausted_sent', '0')
  end
end

-- A hold event: the call's hold as it now stands, for the Postgres call_holds table.
local function outbox_hold(stream, org_id, org, call_id, status, h, charged, billed, now_ms)
  rcall('XADD', stream, '*',
    't', 'H', 'o', org_id, 'c', call_id, 'st', status, 'h', hold_encode(h),
    'ch', istr(charged), 'bs', istr(billed), 'ms', istr(now_ms), 's', istr(org.seq))
end
