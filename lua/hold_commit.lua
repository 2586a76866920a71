--[[
  Commit a call at its actual cost, exactly once per call id.
  - Live hold: charge the cost at the hold's rate, release the hold (the unused part returns to
    available at once).
  - No hold and never resolved (an outbound call, a lost assistant-request): direct billing at
    the org's rate, when ARGV[10] allows it; otherwise unknown_call and nothing changes (the
    caller asks Postgres first whether the call was resolved longer ago than Redis remembers).
  - Already released or expired (the report came late): charge or refund the difference between
    the true cost and what was charged then.
  - Already committed: a replay. The same billed seconds give the first outcome; other billed
    seconds are refused as idempotency_conflict (the first commit stands).
  Charges are never refused and never dropped: the balance goes down to the org's overdraft
  floor and the rest is recorded as debt. Commits append to the outbox even above outbox_max
  (they resolve holds; refusing them would not stop the call that already happened).

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
    ARGV[6] adjust_key            ledger key of a late report's difference
    ARGV[7] billed_seconds        0 .. 604800
    ARGV[8] idempotency_ttl_ms
    ARGV[9] meta                  JSON object recorded with the ledger entry
    ARGV[10] direct_billing       1: bill a call Redis knows nothing of; 0: answer unknown_call

  Output: {code, balance_pence, held_pence, available_pence, debt_pence, seq, depletion_ms,
           charged_pence, debt_delta_pence, hold_pence}
     0  ok
     1  replayed
     2  adjusted
     3  unknown_call
    -2  org_unknown
    -3  idempotency_conflict
  charged_pence is what this call moved (negative for a refund in an adjustment); for a replay
  or conflict it is the first commit's charge.
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
local adjust_key = ARGV[6]
local billed = int_arg(ARGV[7], 'billed_seconds', 0, 604800)
local ttl = int_arg(ARGV[8], 'idempotency_ttl_ms', 1, 9007199254740991)
local direct_billing = int_arg(ARGV[10], 'direct_billing', 0, 1)
local meta = ARGV[9]

local org = org_load(KEYS[1])
if org == nil then
  return with_tail(head(CODE_ORG_UNKNOWN, nil), {0, 0, 0})
end
idem_prune(KEYS[3], KEYS[4], now)

local state_text = idem_get(KEYS[3], call_state_key)
if state_text ~= nil then
  local state = call_state_decode(state_text)
  if state.status == 'committed' then
    if state.billed_seconds == billed then
      return with_tail(head(CODE_REPLAYED, org), {state.charged_pence, 0, 0})
    end
    return with_tail(head(CODE_IDEMPOTENCY_CONFLICT, org), {state.charged_pence, 0, 0})
  end
  -- Released or expired earlier: settle the difference to the true cost.
  local true_cost = cost_pence(billed, state.rate)
  local difference = true_cost - state.charged_pence
  local amount, debt_delta = 0, 0
  if difference > 0 then
    amount, debt_delta = org_charge(org, difference)
  elseif difference < 0 then
    amount, debt_delta = org_credit(org, -difference)
  end
  org_save_money(KEYS[1], org)
  idem_put(KEYS[3], KEYS[4], call_state_key,
    call_state_encode('committed', true_cost, billed, state.rate), now + ttl)
  if amount ~= 0 or debt_delta ~= 0 then
    outbox_ledger(KEYS[5], org_id, org, {
      key = adjust_key, kind = 'call_adjustment', amount = amount, debt_delta = debt_delta,
      call_id = call_id, billed_seconds = billed, rate = state.rate, meta = meta,
    }, now)
  end
  local h = {hold_pence = 0, rate = state.rate, created_ms = now, started_ms = 0,
             last_seen_ms = now, expires_ms = now, max_duration_s = 0, version = 0, ended_ms = 0}
  outbox_hold(KEYS[5], org_id, org, call_id, 'committed', h, true_cost, billed, now)
  if difference > 0 then
    alerts_after_debit(KEYS[1], KEYS[5], org_id, org, now)
  end
  return with_tail(head(CODE_ADJUSTED, org), {difference, debt_delta, 0})
end

local record = rcall('HGET', KEYS[2], call_id)
local h
if record ~= false then
  h = hold_decode(record)
  org.held_pence = org.held_pence - h.hold_pence
  burn_remove(org, h, now)
  rcall('HDEL', KEYS[2], call_id)
else
  if direct_billing == 0 then
    return with_tail(head(CODE_UNKNOWN_CALL, org), {0, 0, 0})
  end
  -- Direct billing: no hold was ever taken for this call.
  h = {hold_pence = 0, rate = org.rate_pence_per_minute, created_ms = now, started_ms = 0,
       last_seen_ms = now, expires_ms = now, max_duration_s = 0, version = 0, ended_ms = 0}
end
local cost = cost_pence(billed, h.rate)
local amount, debt_delta = org_charge(org, cost)
h.version = h.version + 1
org_save_money(KEYS[1], org)
idem_put(KEYS[3], KEYS[4], call_state_key,
  call_state_encode('committed', cost, billed, h.rate), now + ttl)
if cost > 0 then
  outbox_ledger(KEYS[5], org_id, org, {
    key = charge_key, kind = 'call_charge', amount = amount, debt_delta = debt_delta,
    call_id = call_id, billed_seconds = billed, rate = h.rate, meta = meta,
  }, now)
end
outbox_hold(KEYS[5], org_id, org, call_id, 'committed', h, cost, billed, now)
alerts_after_debit(KEYS[1], KEYS[5], org_id, org, now)
return with_tail(head(CODE_OK, org), {cost, debt_delta, h.hold_pence})
