--[[
  Deduct the cost of a one-off asset (a phone number), zero-debt and idempotent by key.
  Refused when available_pence < amount_pence; a refusal records nothing, so the same key may
  succeed later (after a top-up).

  Input:
    KEYS[1] org hash              <prefix>:{org:<org_id>}:org
    KEYS[2] idempotency hash      <prefix>:{org:<org_id>}:idem
    KEYS[3] idempotency expiries  <prefix>:{org:<org_id>}:idem_exp
    KEYS[4] outbox stream         <prefix>:{org:<org_id>}:outbox

    ARGV[1] now_ms                0 = Redis TIME
    ARGV[2] org_id
    ARGV[3] ledger_key            the deduction's ledger idempotency key
    ARGV[4] amount_pence          1 .. 10^12
    ARGV[5] fingerprint           what else the request said; a replay must say the same
    ARGV[6] idempotency_ttl_ms
    ARGV[7] outbox_max            refuse (fail closed) when the outbox holds this many entries
    ARGV[8] meta                  JSON object recorded with the ledger entry

  Output: {code, balance_pence, held_pence, available_pence, debt_pence, seq, depletion_ms,
           charged_pence, balance_pence_after_first}
     0  ok
     1  replayed
    -1  insufficient_funds
    -2  org_unknown
    -3  idempotency_conflict
    -6  outbox_full
]]
--- @include "_base"
--- @include "_clock"
--- @include "_org"
--- @include "_idem"
--- @include "_outbox"
--- @include "_alerts"
--- @include "_codes"

local now = clock_ms(ARGV[1])
local org_id = ARGV[2]
local ledger_key = ARGV[3]
local amount = int_arg(ARGV[4], 'amount_pence', 1, 1000000000000)
local fingerprint = ARGV[5]
local ttl = int_arg(ARGV[6], 'idempotency_ttl_ms', 1, 9007199254740991)
local outbox_max = int_arg(ARGV[7], 'outbox_max', 1, 100000000)
local meta = ARGV[8]

local org = org_load(KEYS[1])
if org == nil then
  return with_tail(head(CODE_ORG_UNKNOWN, nil), {0, 0})
end
idem_prune(KEYS[2], KEYS[3], now)
local first = idem_get(KEYS[2], ledger_key)
if first ~= nil then
  local first_amount, first_fingerprint, first_balance = string.match(first, '^(%d+)|(.*)|(%-?%d+)$')
  if first_amount == istr(amount) and first_fingerprint == fingerprint then
    return with_tail(head(CODE_REPLAYED, org), {amount, tonumber(first_balance)})
  end
  return with_tail(head(CODE_IDEMPOTENCY_CONFLICT, org), {0, 0})
end
if org.balance_pence - org.held_pence < amount then
  return with_tail(head(CODE_INSUFFICIENT_FUNDS, org), {0, 0})
end
if not outbox_has_room(KEYS[4], outbox_max) then
  return with_tail(head(CODE_OUTBOX_FULL, org), {0, 0})
end

org.balance_pence = org.balance_pence - amount
org_save_money(KEYS[1], org)
idem_put(KEYS[2], KEYS[3], ledger_key,
  istr(amount) .. '|' .. fingerprint .. '|' .. istr(org.balance_pence), now + ttl)
outbox_ledger(KEYS[4], org_id, org, {
  key = ledger_key, kind = 'asset', amount = -amount, debt_delta = 0,
  fingerprint = fingerprint, meta = meta,
}, now)
alerts_after_debit(KEYS[1], KEYS[4], org_id, org, now)
return with_tail(head(CODE_OK, org), {amount, org.balance_pence})
