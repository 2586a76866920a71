--[[
  Adopt Vapi's call id for a call the engine placed (POST /api/calls, engine/dial.py): the hold
  taken under the request's reservation id before Vapi answered moves, as it stands (amount,
  expiry, clock), to the call id Vapi gave the call. Nothing about money changes: held_pence and
  the burn sums are the same hold's. Whoever comes first adopts (the request when Vapi answers,
  or the webhook when a message of the call, which carries the reservation id, arrives before
  that or after the request's process died); the rest are replays.

  The reservation id is then resolved (released, 0 pence: a reserve of it again is refused) and
  the dial record says which call it became, for a retried request to answer with. Postgres gets
  both: the reservation's row released, the call's row live.

  Input:
    KEYS[1] org hash              <prefix>:{org:<org_id>}:org
    KEYS[2] holds hash            <prefix>:{org:<org_id>}:holds
    KEYS[3] idempotency hash      <prefix>:{org:<org_id>}:idem
    KEYS[4] idempotency expiries  <prefix>:{org:<org_id>}:idem_exp
    KEYS[5] outbox stream         <prefix>:{org:<org_id>}:outbox

    ARGV[1] now_ms                0 = Redis TIME
    ARGV[2] org_id
    ARGV[3] reservation_id        the call id the hold was taken under
    ARGV[4] call_id               Vapi's id of the call
    ARGV[5] reservation_state_key idempotency field of the reservation's resolution
    ARGV[6] call_state_key        idempotency field of the call's resolution
    ARGV[7] dial_key              idempotency field of the dial record
    ARGV[8] idempotency_ttl_ms

  Output: {code, balance_pence, held_pence, available_pence, debt_pence, seq, depletion_ms,
           hold_pence, max_duration_s}
     0  ok
     1  replayed                  (this call adopted the reservation before)
    -2  org_unknown
    -3  idempotency_conflict      (the reservation became another call, or the call has its own)
    -4  hold_not_found            (the reservation holds nothing: released, expired, never taken)

  On idempotency_conflict nothing moved: the caller releases the reservation's hold, if any.
]]
--- @include "_base"
--- @include "_clock"
--- @include "_org"
--- @include "_holds"
--- @include "_idem"
--- @include "_outbox"
--- @include "_codes"

local now = clock_ms(ARGV[1])
local org_id = ARGV[2]
local reservation_id = ARGV[3]
local call_id = ARGV[4]
local reservation_state_key = ARGV[5]
local call_state_key = ARGV[6]
local dial_key = ARGV[7]
local ttl = int_arg(ARGV[8], 'idempotency_ttl_ms', 1, 9007199254740991)

local org = org_load(KEYS[1])
if org == nil then
  return with_tail(head(CODE_ORG_UNKNOWN, nil), {0, 0})
end
idem_prune(KEYS[3], KEYS[4], now)
local record = idem_get(KEYS[3], dial_key)
if record ~= nil then
  local adopted, hold_pence, max_duration_s = string.match(record, '^placed|([^|]+)|(%d+)|(%d+)$')
  if adopted == call_id then
    return with_tail(head(CODE_REPLAYED, org), {tonumber(hold_pence), tonumber(max_duration_s)})
  end
  if adopted ~= nil then
    return with_tail(head(CODE_IDEMPOTENCY_CONFLICT, org), {0, 0})
  end
end
local text = rcall('HGET', KEYS[2], reservation_id)
if text == false then
  return with_tail(head(CODE_HOLD_NOT_FOUND, org), {0, 0})
end
if rcall('HEXISTS', KEYS[2], call_id) == 1 or idem_get(KEYS[3], call_state_key) ~= nil then
  return with_tail(head(CODE_IDEMPOTENCY_CONFLICT, org), {0, 0})
end

local h = hold_decode(text)
h.version = h.version + 1
rcall('HDEL', KEYS[2], reservation_id)
rcall('HSET', KEYS[2], call_id, hold_encode(h))
idem_put(KEYS[3], KEYS[4], reservation_state_key, call_state_encode('released', 0, 0, h.rate), now + ttl)
idem_put(KEYS[3], KEYS[4], dial_key,
  'placed|' .. call_id .. '|' .. istr(h.hold_pence) .. '|' .. istr(h.max_duration_s), now + ttl)
org.seq = org.seq + 1
rcall('HSET', KEYS[1], 'seq', istr(org.seq))
outbox_hold(KEYS[5], org_id, org, reservation_id, 'released', h, 0, 0, now)
outbox_hold(KEYS[5], org_id, org, call_id, 'live', h, 0, 0, now)
return with_tail(head(CODE_OK, org), {h.hold_pence, h.max_duration_s})
