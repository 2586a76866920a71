--[[
  Confirm that a call's warning or end-call reached Vapi (the control URL answered 2xx).
  The first confirmation of an end-call appends a call_ended_no_credit alert; repeats change
  nothing.

  Input:
    KEYS[1] org hash              <prefix>:{org:<org_id>}:org
    KEYS[2] kill hash             <prefix>:{org:<org_id>}:kill
    KEYS[3] outbox stream         <prefix>:{org:<org_id>}:outbox

    ARGV[1] now_ms                0 = Redis TIME
    ARGV[2] org_id
    ARGV[3] call_id
    ARGV[4] action                'warn' | 'end'

  Output: {code}
     0  ok
     1  replayed
    -2  org_unknown
    -4  hold_not_found
]]
--- @include "_base"
--- @include "_clock"
--- @include "_org"
--- @include "_alerts"
--- @include "_codes"

local now = clock_ms(ARGV[1])
local org_id = ARGV[2]
local call_id = ARGV[3]
local action = ARGV[4]
if action ~= 'warn' and action ~= 'end' then
  error('bad argument action: ' .. tostring(action))
end

local org = org_load(KEYS[1])
if org == nil then
  return {CODE_ORG_UNKNOWN}
end
local text = rcall('HGET', KEYS[2], call_id)
if text == false then
  -- The call's report came first and its progress is gone; the alert's key keeps it once.
  if action == 'end' then
    outbox_alert(KEYS[3], org_id, org, 'call_ended_no_credit', call_id, now)
  end
  return {CODE_HOLD_NOT_FOUND}
end
local s = {}
for part in string.gmatch(text, '[^|]+') do
  s[#s + 1] = part
end
local index = 1
if action == 'end' then
  index = 4
end
if s[index] == '1' then
  return {CODE_REPLAYED}
end
s[index] = '1'
rcall('HSET', KEYS[2], call_id, table.concat(s, '|'))
if action == 'end' then
  outbox_alert(KEYS[3], org_id, org, 'call_ended_no_credit', call_id, now)
end
return {CODE_OK}
