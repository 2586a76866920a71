--[[
  Reserve credit for a call: take a hold of one block of minutes (capped at what is
  available), idempotent per call id. The hold counts against available_pence at once.
  Also answers how long the call may run: the seconds the org's whole available credit funds
  (Vapi's maxDurationSeconds, enforced by Vapi even if we are down).

  A call that is already running when the engine first sees it (a status-update in-progress
  with no hold: outbound, a lost assistant-request) cannot be refused, only ended. With mode 1,
  when it cannot be funded (short of credit, at max_concurrent_calls, outbox full), an
  *unfunded* hold is recorded instead: 0 pence, max_duration_s 0. It counts against
  max_concurrent_calls while the call lives, the kill switch ends it at once (depletion_ms is
  now), it is never extended, and its report bills it in full (to the overdraft floor, then as
  debt). Mode 2 records an unfunded hold whatever the credit (the call must not be funded: its
  number is suspended). It is appended to the outbox even above outbox_max: it records a call
  that is happening, like a commit.
  Input:
    KEYS[1] org hash              <prefix>:{org:<org_id>}:org
    KEYS[2] holds hash            <prefix>:{org:<org_id>}:holds
    KEYS[3] idempotency hash      <prefix>:{org:<org_id>}:idem
    KEYS[4] outbox stream         <prefix>:{org:<org_id>}:outbox

    ARGV[1] now_ms                0 = Redis TIME
    ARGV[2] org_id
    ARGV[3] call_id
    ARGV[4] call_state_key        idempotency field of the call's resolution
    ARGV[5] report_slack_ms       how long after its funded time a silent hold expires
    ARGV[6] outbox_max            refuse (fail closed) when the outbox holds this many entries
    ARGV[7] mode                  0: refuse what cannot be funded; 1: record it unfunded;
                                  2: record it unfunded in any case

  Output: {code, balance_pence, held_pence, available_pence, debt_pence, seq, depletion_ms,
           hold_pence, max_duration_s}
     0  ok
     1  replayed                  (hold_pence and max_duration_s are 0 for an unfunded hold)
     4  admitted_unfunded
    -1  insufficient_funds
    -2  org_unknown
    -5  call_already_resolved
    -6  outbox_full
    -7  too_many_calls
]]
--- @include "_base"
--- @include "_clock"
--- @include "_org"
--- @include "_holds"
--- @include "_outbox"
--- @include "_alerts"
--- @include "_codes"

local MAX_DURATION_S_MIN = 10
local MAX_DURATION_S_MAX = 43200

local now = clock_ms(ARGV[1])
local org_id = ARGV[2]
local call_id = ARGV[3]
local call_state_key = ARGV[4]
local slack_ms = int_arg(ARGV[5], 'report_slack_ms', 0, 86400000)
local outbox_max = int_arg(ARGV[6], 'outbox_max', 1, 100000000)
local mode = int_arg(ARGV[7], 'mode', 0, 2)

local org = org_load(KEYS[1])
if org == nil then
  return with_tail(head(CODE_ORG_UNKNOWN, nil), {0, 0})
end
local existing = rcall('HGET', KEYS[2], call_id)
if existing ~= false then
  local h = hold_decode(existing)
  return with_tail(head(CODE_REPLAYED, org), {h.hold_pence, h.max_duration_s})
end
if rcall('HEXISTS', KEYS[3], call_state_key) == 1 then
  return with_tail(head(CODE_CALL_ALREADY_RESOLVED, org), {0, 0})
end

local rate = org.rate_pence_per_minute
local available = org.balance_pence - org.held_pence
local funded_s = 0
if available > 0 then
  funded_s = math.floor(available * 60 / rate)
end
local refusal = nil
if mode == 2 then
  refusal = CODE_OK
elseif org.max_concurrent_calls > 0 and rcall('HLEN', KEYS[2]) >= org.max_concurrent_calls then
  refusal = CODE_TOO_MANY_CALLS
elseif available <= 0 or available < org.min_start_pence or funded_s < MAX_DURATION_S_MIN then
  refusal = CODE_INSUFFICIENT_FUNDS
elseif not outbox_has_room(KEYS[4], outbox_max) then
  refusal = CODE_OUTBOX_FULL
end
if refusal ~= nil and mode == 0 then
  return with_tail(head(refusal, org), {0, 0})
end

local h
if refusal == nil then
  local max_duration_s = math.min(funded_s, MAX_DURATION_S_MAX)
  h = {
    hold_pence = math.min(org.hold_block_minutes * rate, available), rate = rate, created_ms = now,
    started_ms = 0, last_seen_ms = now, expires_ms = now + max_duration_s * 1000 + slack_ms,
    max_duration_s = max_duration_s, version = 1, ended_ms = 0,
  }
else
  h = {
    hold_pence = 0, rate = rate, created_ms = now, started_ms = 0, last_seen_ms = now,
    expires_ms = now + slack_ms, max_duration_s = 0, version = 1, ended_ms = 0,
  }
end
org.held_pence = org.held_pence + h.hold_pence
burn_add(org, h, now)
org_save_money(KEYS[1], org)
rcall('HSET', KEYS[2], call_id, hold_encode(h))
outbox_hold(KEYS[4], org_id, org, call_id, 'live', h, 0, 0, now)
if refusal ~= nil then
  rcall('HINCRBY', KEYS[1], 'unfunded_n', 1)  -- the kill switch's reschedule looks for this (killswitch_tick.lua)
  local reply = head(CODE_ADMITTED_UNFUNDED, org)
  reply[7] = now  -- the kill switch visits the org at once and ends this call
  return with_tail(reply, {0, 0})
end
alerts_after_debit(KEYS[1], KEYS[4], org_id, org, now)
return with_tail(head(CODE_OK, org), {h.hold_pence, h.max_duration_s})
