--[[
  The script's clock: Redis TIME unless the caller passes a positive now_ms (tests only).
]]
--- @include "_base"

local function clock_ms(override_arg)
  local override = int_arg(override_arg, 'now_ms', 0, 9007199254740991)
  if override > 0 then
    return override
  end
  local t = rcall('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
