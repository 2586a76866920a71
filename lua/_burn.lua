--[[
  The kill switch's burn sums on an org (any table with balance_pence and the four burn fields):
  bringing them up to a second, and the depletion moment they predict. Pure functions; the
  holds library moves them as holds come and go (burn_add, burn_remove).
]]

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
