--[[
  Read an org's money at one instant, changing nothing: what a wallet read and a repair need.
  A script, not MULTI, because Redis Cluster clients cannot send MULTI (and one EVALSHA is one
  round trip either way).

  Input:
    KEYS[1] org hash              <prefix>:{org:<org_id>}:org
    KEYS[2] holds hash            <prefix>:{org:<org_id>}:holds
    KEYS[3] outbox stream         <prefix>:{org:<org_id>}:outbox

  Output: {code, balance_pence, held_pence, debt_pence, live_calls, seq, outbox_entries}
     0  ok
    -2  org_unknown               (the numbers are then all 0)
]]
--- @include "_codes"

local money = redis.call('HMGET', KEYS[1], 'balance_pence', 'held_pence', 'debt_pence', 'seq')
local outbox_entries = redis.call('XLEN', KEYS[3])
if money[1] == false then
  return {CODE_ORG_UNKNOWN, 0, 0, 0, 0, 0, outbox_entries}
end
return {CODE_OK, tonumber(money[1]), tonumber(money[2]), tonumber(money[3]), redis.call('HLEN', KEYS[2]),
        tonumber(money[4] or 0), outbox_entries}
