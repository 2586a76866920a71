--[[
  The kill-switch decision for a live call; also starts and stops the call's clock.
  Cost so far comes from the seconds since the call started (until it ended, once it has) and
  the hold's rate. While the call runs and less than a minute of its hold is left, the hold is
  extended block by block while the org has available credit (like telecom quota
  re-authorisation). end_call is 1 once the call has used all the time its hold funds and no
  more credit can be added, or once the call has ended.

  Input:
    KEYS[1] org hash              <prefix>:{org:<org_id>}:org
    KEYS[2] holds hash            <prefix>:{org:<org_id>}:holds
    KEYS[3] outbox stream         <prefix>:{org:<org_id>}:outbox

    ARGV[1] now_ms                0 = Redis TIME
    ARGV[2] org_id
    ARGV[3] call_id
    ARGV[4] event                 0 = a check; 1 = the call is in progress: start its clock
                                  (once); 2 = the call ended: stop its clock (once)
    ARGV[5] report_slack_ms       how long after its funded time (or its end) a silent hold expires
    ARGV[6] outbox_max            no extension (fail closed) when the outbox holds this many
    ARGV[7] extensions_max        blocks this check may add, 1 .. 64

  Output: {code, balance_pence, held_pence, available_pence, debt_pence, seq,
           end_call, cost_so_far_pence, hold_pence, remaining_ms, started, recorded, ended}
  recorded is 1 when this call appended a hold event to the outbox.
     0  ok
    -2  org_unknown
    -4  hold_not_found
]]
--- @include "_lib"

local now = clock_ms(ARGV[1])
local org_id = ARGV[2]
local call_id = ARGV[3]
local event = int_arg(ARGV[4], 'event', 0, 2)
local slack_ms = int_arg(ARGV[5], 'report_slack_ms', 0, 86400000)
local outbox_max = int_arg(ARGV[6], 'outbox_max', 1, 100000000)
local extensions_max = int_arg(ARGV[7], 'extensions_max', 1, 64)

local org = org_load(KEYS[1])
if org == nil then
  return with_tail(head(-2, nil), {0, 0, 0, 0, 0, 0, 0})
end
local record = rcall('HGET', KEYS[2], call_id)
if record == false then
  return with_tail(head(-4, org), {0, 0, 0, 0, 0, 0, 0})
end
local h = hold_decode(record)
local changed = false

if event == 1 and h.started_ms == 0 and h.ended_ms == 0 then
  h.started_ms = now
  h.expires_ms = math.max(h.expires_ms, now + h.max_duration_s * 1000 + slack_ms)
  changed = true
elseif event == 2 and h.ended_ms == 0 then
  h.ended_ms = now
  h.expires_ms = now + slack_ms  -- the end-of-call report is due now; expire if it never comes
  changed = true
end

local clock_ms_now = now
if h.ended_ms > 0 and h.ended_ms < now then
  clock_ms_now = h.ended_ms
end
local elapsed_ms = 0
if h.started_ms > 0 and clock_ms_now > h.started_ms then
  elapsed_ms = clock_ms_now - h.started_ms
end
local cost = cost_pence(billed_seconds_from_ms(elapsed_ms), h.rate)

-- Extend while less than a minute of the hold is left. A hold event must be recorded for
-- every extension, so a full outbox means no extension.
local running = h.started_ms > 0 and h.ended_ms == 0
if running and h.hold_pence - cost < h.rate and outbox_has_room(KEYS[3], outbox_max) then
  for _ = 1, extensions_max do
    local available = org.balance_pence - org.held_pence
    if available <= 0 then
      break
    end
    local add = math.min(org.hold_block_minutes * h.rate, available)
    h.hold_pence = h.hold_pence + add
    org.held_pence = org.held_pence + add
    changed = true
    if h.hold_pence - cost >= h.rate then
      break
    end
  end
end

local funded_ms = math.floor(h.hold_pence * 60000 / h.rate)
local remaining_ms = funded_ms - elapsed_ms
local end_call = 0
if h.ended_ms > 0 or (h.started_ms > 0 and remaining_ms <= 0) then
  end_call = 1
end

h.last_seen_ms = math.max(h.last_seen_ms, now)
if changed then
  h.version = h.version + 1
  org_save_money(KEYS[1], org)
  outbox_hold(KEYS[3], org_id, org, call_id, 'live', h, 0, 0, now)
end
rcall('HSET', KEYS[2], call_id, hold_encode(h))
local started, recorded, ended = 0, 0, 0
if h.started_ms > 0 then
  started = 1
end
if changed then
  recorded = 1
end
if h.ended_ms > 0 then
  ended = 1
end
return with_tail(head(0, org), {end_call, cost, h.hold_pence, remaining_ms, started, recorded, ended})
