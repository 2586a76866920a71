--[[
  Resolve a live hold without a report from the call: 'release' (the engine knows the call is
  over, e.g. it ended before being answered) or 'expire' (the hold's expiry has passed and the
  call never reported). Either way the call is charged for the time it is known to have run
  (from its start to its end, or to the last moment it was seen; nothing if it never started) and
  the rest is
  released. A hold resolves exactly once: a commit that comes later settles the difference
  (see hold_commit.lua), a second release or expiry is a replay.

  Input:
    KEYS[1] org hash              <prefix>:{org:<org_id>}:org
    KEYS[2] holds hash            <prefix>:{org:<org_id>}:holds
    KEYS[3] idempotency hash      <prefix>:{org:<org_id>}:idem
    KEYS[4] idempotency expiries  <prefix>:{org:<org_id>}:idem_exp
    KEYS[5] outbox stream         <prefix>:{org:<org_id>}:outbox

    ARGV[1] now_ms                0 = Redis TIME
    ARGV[2] org_id
    ARGV[3] call_id
    ARGV[4] call_state_key        idempotency field of the call's resolution
    ARGV[5] charge_key            ledger key of the call's charge
    ARGV[6] mode                  'release' | 'expire'
    ARGV[7] idempotency_ttl_ms

  Output: {code, balance_pence, held_pence, available_pence, debt_pence, seq, depletion_ms,
           charged_pence, debt_delta_pence, hold_pence}
     0  ok
     1  replayed
    -2  org_unknown
    -4  hold_not_found
    -8  not_expired
]]
--- @include "_base"
--- @include "_clock"
--- @include "_money"
--- @include "_org"
--- @include "_holds"
--- @include "_idem"
--- @include "_outbox"
--- @include "_alerts"
--- @include "_codes"

local now = clock_ms(ARGV[1])
local org_id = ARGV[2]
local call_id = ARGV[3]
local call_state_key = ARGV[4]
local charge_key = ARGV[5]
local mode = ARGV[6]
local ttl = int_arg(ARGV[7], 'idempotency_ttl_ms', 1, 9007199254740991)
if mode ~= 'release' and mode ~= 'expire' then
  error('bad argument mode: ' .. tostring(mode))
end

local org = org_load(KEYS[1])
if org == nil then
  return with_tail(head(CODE_ORG_UNKNOWN, nil), {0, 0, 0})
end
idem_prune(KEYS[3], KEYS[4], now)
local record = rcall('HGET', KEYS[2], call_id)
if record == false then
  local state_text = idem_get(KEYS[3], call_state_key)
  if state_text ~= nil then
    return with_tail(head(CODE_REPLAYED, org), {call_state_decode(state_text).charged_pence, 0, 0})
  end
  return with_tail(head(CODE_HOLD_NOT_FOUND, org), {0, 0, 0})
end
local h = hold_decode(record)
if mode == 'expire' and now < h.expires_ms then
  return with_tail(head(CODE_NOT_EXPIRED, org), {0, 0, h.hold_pence})
end

local billed = 0
if h.started_ms > 0 then
  billed = billed_seconds_from_ms(hold_known_until_ms(h) - h.started_ms)
end
local cost = cost_pence(billed, h.rate)
local amount, debt_delta = org_charge(org, cost)
org.held_pence = org.held_pence - h.hold_pence
burn_remove(org, h, now)
h.version = h.version + 1
org_save_money(KEYS[1], org)
rcall('HDEL', KEYS[2], call_id)
local status = 'released'
local kind = 'call_charge'
if mode == 'expire' then
  status = 'expired'
  kind = 'call_expired'
end
idem_put(KEYS[3], KEYS[4], call_state_key, call_state_encode(status, cost, billed, h.rate), now + ttl)
if cost > 0 then
  outbox_ledger(KEYS[5], org_id, org, {
    key = charge_key, kind = kind, amount = amount, debt_delta = debt_delta,
    call_id = call_id, billed_seconds = billed, rate = h.rate,
  }, now)
end
outbox_hold(KEYS[5], org_id, org, call_id, status, h, cost, billed, now)
alerts_after_debit(KEYS[1], KEYS[5], org_id, org, now)
return with_tail(head(CODE_OK, org), {cost, debt_delta, h.hold_pence})
