--[[
  Money arithmetic in integer pence, mirrored by engine/amounts.py: billed seconds, a call's
  cost, a charge down to the overdraft floor, a credit that repays debt first. Pure functions.
]]

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
