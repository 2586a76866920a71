--[[
  The kill switch's visit to one org: which of its live calls must be warned or ended now.
  The org's depletion moment D comes from its burn sums (_burn.lua): every running call draws
  on the one balance, so all of them are warned at D - warn_lead and ended at D + grace.
  Each call's progress is kept in the kill hash ("warn|warn_tries|warn_next_ms|end|end_tries|
  end_next_ms", phases 0 pending, 1 done, 2 given up). An action handed out counts as an
  attempt and is due again after a backoff unless killswitch_ack.lua confirms it first, so a
  worker that dies mid-request leaves nothing undone. A call whose deadline a top-up moved
  away is no longer at risk: its pending warning and end-call are forgotten, and warned again
  if the credit runs low again. Calls that have ended are left alone. A call on an unfunded hold
  (max_duration_s 0: hold_reserve.lua) is ended at once, without a warning.

  Input:
    KEYS[1] org hash              <prefix>:{org:<org_id>}:org
    KEYS[2] holds hash            <prefix>:{org:<org_id>}:holds
    KEYS[3] kill hash             <prefix>:{org:<org_id>}:kill
    KEYS[4] outbox stream         <prefix>:{org:<org_id>}:outbox
    KEYS[5] control URLs hash     <prefix>:{org:<org_id>}:control

    ARGV[1] now_ms                0 = Redis TIME
    ARGV[2] org_id
    ARGV[3] warn_lead_ms          warn this long before depletion
    ARGV[4] attempts_max          attempts per action before giving up
    ARGV[5] backoff_base_ms       the wait after the first attempt; doubles per attempt
    ARGV[6] backoff_max_ms
    ARGV[7] recheck_ms            the next visit while calls burn and nothing is due sooner

  Output: {code, now_ms, depletion_ms, next_visit_ms, unfunded_n, (call_id, action, attempt)...}
  unfunded_n is the org's count of unfunded holds ever taken (hold_reserve.lua): the caller reads
  it again after filing the next visit, and files the org for now if one was taken meanwhile.
  action is 'warn', 'end' or 'end_failed' (attempts used up: the call is flagged and an
  end_call_failed alert is in the outbox). depletion_ms and next_visit_ms are 0 for none.
     0  ok
    -2  org_unknown
]]
--- @include "_base"
--- @include "_clock"
--- @include "_burn"
--- @include "_org"
--- @include "_holds"
--- @include "_alerts"
--- @include "_codes"

local now = clock_ms(ARGV[1])
local org_id = ARGV[2]
local warn_lead = int_arg(ARGV[3], 'warn_lead_ms', 0, 3600000)
local attempts_max = int_arg(ARGV[4], 'attempts_max', 1, 100)
local backoff_base = int_arg(ARGV[5], 'backoff_base_ms', 1, 3600000)
local backoff_max = int_arg(ARGV[6], 'backoff_max_ms', 1, 3600000)
local recheck = int_arg(ARGV[7], 'recheck_ms', 1000, 3600000)

local org = org_load(KEYS[1])
if org == nil then
  return {CODE_ORG_UNKNOWN, now, 0, 0, 0}
end

local function decode_state(text)
  if not text then
    return {0, 0, 0, 0, 0, 0}
  end
  local s = {}
  for part in string.gmatch(text, '[^|]+') do
    s[#s + 1] = tonumber(part)
  end
  if #s ~= 6 then
    error('corrupt kill state: ' .. text)
  end
  return s
end

local function backoff(tries)
  return math.min(backoff_base * 2 ^ (tries - 1), backoff_max)
end

local deadline = burn_deadline_ms(org)
local unfunded_n = tonumber(rcall('HGET', KEYS[1], 'unfunded_n')) or 0
local live = rcall('HGETALL', KEYS[2])
local is_live = {}
for i = 1, #live, 2 do
  is_live[live[i]] = live[i + 1]
end
-- Forget the progress and the control URLs of calls that are over (a URL is kept only while
-- its call holds credit: a call admitted but not yet held is written after its hold).
for _, key in ipairs({KEYS[3], KEYS[5]}) do
  for _, call_id in ipairs(rcall('HKEYS', key)) do
    if is_live[call_id] == nil then
      rcall('HDEL', key, call_id)
    end
  end
end
if deadline == 0 then
  return {CODE_OK, now, 0, 0, unfunded_n}
end

local warn_at = deadline - warn_lead
local end_at = deadline + org.grace_seconds * 1000
local next_visit = now + recheck
local reply = {CODE_OK, now, deadline, 0, unfunded_n}

local function consider(at)
  if at < next_visit then
    next_visit = at
  end
end

-- One step of an action (offset 0: the warning, 3: the end-call). Returns true if handed out.
local function step(s, offset, call_id, action)
  if s[offset + 1] ~= 0 then
    return false
  end
  if s[offset + 3] > now then
    consider(s[offset + 3])
    return false
  end
  if s[offset + 2] >= attempts_max then
    s[offset + 1] = 2
    if action == 'end' then
      reply[#reply + 1] = call_id
      reply[#reply + 1] = 'end_failed'
      reply[#reply + 1] = s[offset + 2]
      outbox_alert(KEYS[4], org_id, org, 'end_call_failed', call_id, now)
    end
    return true
  end
  s[offset + 2] = s[offset + 2] + 1
  s[offset + 3] = now + backoff(s[offset + 2])
  consider(s[offset + 3])
  reply[#reply + 1] = call_id
  reply[#reply + 1] = action
  reply[#reply + 1] = s[offset + 2]
  return true
end

for i = 1, #live, 2 do
  local call_id = live[i]
  local h = hold_decode(live[i + 1])
  local text = rcall('HGET', KEYS[3], call_id)
  local s = decode_state(text)
  local before = table.concat(s, '|')
  if h.ended_ms == 0 and h.max_duration_s == 0 then
    -- An unfunded hold (hold_reserve.lua): the engine funds none of this call. End it now,
    -- whatever the org's credit, without a warning.
    step(s, 3, call_id, 'end')
  elseif h.ended_ms == 0 then
    if now < warn_at then
      -- Not at risk (or rescued by a top-up): forget the warning and any end-call attempts,
      -- unless the call was already ended.
      if s[4] ~= 1 then
        s = {0, 0, 0, 0, 0, 0}
      end
      consider(warn_at)
    elseif now < end_at then
      step(s, 0, call_id, 'warn')
      consider(end_at)
    else
      step(s, 3, call_id, 'end')
    end
  end
  local after = table.concat(s, '|')
  if after ~= before or (text == false and after ~= '0|0|0|0|0|0') then
    if after == '0|0|0|0|0|0' then
      rcall('HDEL', KEYS[3], call_id)
    else
      rcall('HSET', KEYS[3], call_id, after)
    end
  end
end
if next_visit < now then
  next_visit = now
end
reply[4] = next_visit
return reply
