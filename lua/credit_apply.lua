--[[
  Apply a credit (top-up or refund) that Postgres has already committed to the ledger.
  Credits are Postgres-first, so the credit itself is not appended to the outbox. If the org
  owes debt, the credit pays it off first, and that repayment is a Redis-first ledger entry
  appended to the outbox here.

  Input:
    KEYS[1] org hash              <prefix>:{org:<org_id>}:org
    KEYS[2] idempotency hash      <prefix>:{org:<org_id>}:idem
    KEYS[3] idempotency expiries  <prefix>:{org:<org_id>}:idem_exp
    KEYS[4] outbox stream         <prefix>:{org:<org_id>}:outbox

    ARGV[1] now_ms                0 = Redis TIME
    ARGV[2] org_id
    ARGV[3] ledger_key            the credit's ledger idempotency key
    ARGV[4] amount_pence          1 .. 10^12
    ARGV[5] repay_key             ledger key for the debt repayment this credit may make
    ARGV[6] idempotency_ttl_ms

  Output: {code, balance_pence, held_pence, available_pence, debt_pence, seq, depletion_ms, repaid_pence}
     0  ok
     1  replayed
    -2  org_unknown
    -3  idempotency_conflict
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
local repay_key = ARGV[5]
local ttl = int_arg(ARGV[6], 'idempotency_ttl_ms', 1, 9007199254740991)

local org = org_load(KEYS[1])
if org == nil then
  return with_tail(head(CODE_ORG_UNKNOWN, nil), {0})
end
idem_prune(KEYS[2], KEYS[3], now)
local first = idem_get(KEYS[2], ledger_key)
if first ~= nil then
  if first == istr(amount) then
    return with_tail(head(CODE_REPLAYED, org), {0})
  end
  return with_tail(head(CODE_IDEMPOTENCY_CONFLICT, org), {0})
end

local _, debt_delta = org_credit(org, amount)
org_save_money(KEYS[1], org)
alerts_rearm(KEYS[1], org)
idem_put(KEYS[2], KEYS[3], ledger_key, istr(amount), now + ttl)
if debt_delta < 0 then
  outbox_ledger(KEYS[4], org_id, org, {
    key = repay_key, kind = 'debt_repayment', amount = debt_delta, debt_delta = debt_delta,
  }, now)
end
return with_tail(head(CODE_OK, org), {-debt_delta})
