--[[
  The kill-switch decision for a live call; also starts and stops the call's clock.
  Cost so far comes from the seconds since the call started (until it ended, once it has) and
  the hold's rate. While the call runs and less than a minute of its hold is left, the hold is
  extended block by block while the org has available credit (like telecom quota
  re-authorisation). end_call is 1 once the call has used all the time its hold funds and no
  more credit can be added, or once the call has ended. An unfunded hold (max_duration_s 0,
  see hold_reserve.lua) funds no time and is never extended: end_call is 1 once its call runs.

  This is the hot path (every status check). It includes _codes.lua only (constants, nothing to
  build) and keeps the libraries' arithmetic spelled out, because including a library builds
  every function of it on every call (and calls cost more than inline arithmetic), which the
  measurement shows slower. Microseconds per check inside Redis, one Redis, the variants' rounds
  interleaved, the median of 7 rounds of 5,000 checks (a shared machine: compare the ratios):
    spelled out, as before the return codes had names                        11.7
    spelled out, with _codes (this script)                                   11.4
    with _base, _clock, _money (clock_ms, int_arg, istr, cost_pence, ...)    12.7
    also _burn, _holds, _outbox, _alerts for the start/end/extension branches 15.9
  So clock_ms (_clock.lua), billed_seconds_from_ms and cost_pence (_money.lua), hold_decode and
  hold_encode (_holds.lua), burn_remove/burn_add (_holds.lua, _burn.lua) and alerts_after_debit
  (_alerts.lua) are spelled out here: no closures to build, no tables for the org or the hold,
  only the five org fields it needs, and the hold record is rewritten only when something
  changed or a second has passed since the call was last seen (billing is per second). The
  stateful test and the Lua tests hold the two equal.

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

  The kill switch's burn sums (see _burn.lua) change only when the call starts or ends, and
  the low-balance alerts only when an extension takes more credit; both are read and written
  in those rare branches alone.

  Output: {code, balance_pence, held_pence, available_pence, debt_pence, seq, depletion_ms,
           end_call, cost_so_far_pence, hold_pence, remaining_ms, started, recorded, ended}
  recorded is 1 when this call appended a hold event to the outbox.
     0  ok
    -2  org_unknown
    -4  hold_not_found
]]
--- @include "_codes"
local rcall = redis.call
local fmt = string.format

local now = tonumber(ARGV[1])
local event = tonumber(ARGV[4])
if now == nil or now < 0 or (event ~= 0 and event ~= 1 and event ~= 2) then
  error('bad argument now_ms or event')
end
if now == 0 then
  local t = rcall('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local v = rcall('HMGET', KEYS[1], 'balance_pence', 'held_pence', 'debt_pence', 'seq', 'hold_block_minutes')
if v[1] == false then
  return {CODE_ORG_UNKNOWN, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
end
local balance, held, debt, seq = tonumber(v[1]), tonumber(v[2]), tonumber(v[3]), tonumber(v[4])
local record = rcall('HGET', KEYS[2], ARGV[3])
if record == false then
  return {CODE_HOLD_NOT_FOUND, balance, held, balance - held, debt, seq, 0, 0, 0, 0, 0, 0, 0, 0}
end

-- The hold record: "hold_pence|rate|created_ms|started_ms|last_seen_ms|expires_ms|max_duration_s|version|ended_ms"
local p, r, c, s, l, e, d, ver, x = string.match(record,
  '^(%d+)|(%d+)|(%d+)|(%d+)|(%d+)|(%d+)|(%d+)|(%d+)|(%d+)$')
if p == nil then
  error('corrupt hold record: ' .. record)
end
local hold, rate, started, last_seen = tonumber(p), tonumber(r), tonumber(s), tonumber(l)
local expires, max_duration_s, version, ended = tonumber(e), tonumber(d), tonumber(ver), tonumber(x)
local changed = false
local depletion_ms = 0

local starting = event == 1 and started == 0 and ended == 0
local ending = event == 2 and ended == 0

-- Burn sums: a start moves the second the call burns from (its reservation -> its start); an
-- end stops the burn and freezes the call's cost. Mirrors burn_add/burn_remove in _holds.lua.
if starting or ending then
  local b = rcall('HMGET', KEYS[1], 'burn_rate', 'burn_k', 'burn_at_s', 'burn_frozen_pence')
  local burn_rate, burn_k = tonumber(b[1]) or 0, tonumber(b[2]) or 0
  local burn_at_s, frozen = tonumber(b[3]) or 0, tonumber(b[4]) or 0
  local now_s = math.floor(now / 1000)
  local from_s = math.floor(tonumber(c) / 1000)
  if started > 0 then
    from_s = math.floor(started / 1000)
  end
  if starting then
    burn_k = burn_k - rate * (now_s - from_s)
  else
    if now_s > burn_at_s then
      burn_k = burn_k + burn_rate * (now_s - burn_at_s)
      burn_at_s = now_s
    end
    burn_rate = burn_rate - rate
    burn_k = burn_k - rate * (burn_at_s - from_s)
    if started > 0 and now > started then
      frozen = frozen + math.floor((math.floor((now - started + 999) / 1000) * rate + 59) / 60)
    end
  end
  rcall('HSET', KEYS[1], 'burn_rate', fmt('%d', burn_rate), 'burn_k', fmt('%d', burn_k),
    'burn_at_s', fmt('%d', burn_at_s), 'burn_frozen_pence', fmt('%d', frozen))
  if burn_rate > 0 then
    local x = math.ceil((60 * (balance - frozen) - burn_k) / burn_rate)
    depletion_ms = math.max(1, (burn_at_s + x) * 1000)
  end
end

if starting then
  started = now
  expires = math.max(expires, now + max_duration_s * 1000 + tonumber(ARGV[5]))
  changed = true
elseif ending then
  ended = now
  expires = now + tonumber(ARGV[5])  -- the end-of-call report is due now; expire if it never comes
  changed = true
end
local extended = false

local clock_now = now
if ended > 0 and ended < now then
  clock_now = ended
end
local elapsed = 0
if started > 0 and clock_now > started then
  elapsed = clock_now - started
end
local billed = 0
if elapsed > 0 then
  billed = math.floor((elapsed + 999) / 1000)
end
local cost = math.floor((billed * rate + 59) / 60)

-- Extend while less than a minute of the hold is left. A hold event must be recorded for
-- every extension, so a full outbox means no extension.
-- An unfunded hold (max_duration_s 0: hold_reserve.lua) is never extended: the kill switch ends its call.
if started > 0 and ended == 0 and max_duration_s > 0 and hold - cost < rate and rcall('XLEN', KEYS[3]) < tonumber(ARGV[6]) then
  local block = tonumber(v[5]) * rate
  for _ = 1, tonumber(ARGV[7]) do
    local available = balance - held
    if available <= 0 then
      break
    end
    local add = math.min(block, available)
    hold = hold + add
    held = held + add
    changed = true
    extended = true
    if hold - cost >= rate then
      break
    end
  end
end

local remaining = math.floor(hold * 60000 / rate) - elapsed
local end_call = 0
if ended > 0 or (started > 0 and remaining <= 0) then
  end_call = 1
end

local seen_moved = now - last_seen >= 1000
if now > last_seen then
  last_seen = now
end
local recorded = 0
if changed then
  version = version + 1
  seq = seq + 1
  rcall('HSET', KEYS[1], 'held_pence', fmt('%d', held), 'seq', fmt('%d', seq))
  recorded = 1
end
if changed or seen_moved then
  record = table.concat({fmt('%d', hold), fmt('%d', rate), c, fmt('%d', started), fmt('%d', last_seen),
    fmt('%d', expires), d, fmt('%d', version), fmt('%d', ended)}, '|')
  rcall('HSET', KEYS[2], ARGV[3], record)
end
if changed then
  rcall('XADD', KEYS[3], '*', 't', 'H', 'o', ARGV[2], 'c', ARGV[3], 'st', 'live', 'h', record,
    'ch', '0', 'bs', '0', 'ms', fmt('%d', now), 's', fmt('%d', seq))
end
if extended then
  -- Low-balance alerts, as alerts_after_debit in _alerts.lua.
  local a = rcall('HMGET', KEYS[1], 'low_balance_threshold_pence', 'alert_low_sent', 'alert_exhausted_sent', 'epoch')
  local threshold = tonumber(a[1]) or 0
  local available = balance - held
  local function alert(kind, flag)
    rcall('HSET', KEYS[1], flag, '1')
    rcall('XADD', KEYS[3], '*', 't', 'A', 'o', ARGV[2], 'k', 'alert:' .. ARGV[2] .. ':' .. kind .. ':' .. fmt('%d.%d', tonumber(a[4]) or 0, seq),
      'kind', kind, 'c', '', 'b', fmt('%d', balance), 'av', fmt('%d', available), 'th', fmt('%d', threshold),
      'ms', fmt('%d', now), 's', fmt('%d', seq))
  end
  if threshold > 0 and a[2] ~= '1' and available < threshold then
    alert('low_balance', 'alert_low_sent')
  end
  if a[3] ~= '1' and available <= 0 then
    alert('balance_exhausted', 'alert_exhausted_sent')
  end
end
local is_started, is_ended = 0, 0
if started > 0 then
  is_started = 1
end
if ended > 0 then
  is_ended = 1
end
return {CODE_OK, balance, held, balance - held, debt, seq, depletion_ms, end_call, cost, hold, remaining, is_started, recorded, is_ended}
