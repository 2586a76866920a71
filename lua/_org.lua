--[[
  An org's state in its hash: loading it, saving its money (and burn sums), charging and
  crediting it, and the head every reply starts with:
  {code, balance, held, available, debt, seq, depletion_ms}.
]]
--- @include "_base"
--- @include "_money"
--- @include "_burn"

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
