--[[
  The base every library and script stands on: redis.call, integer strings, argument checks.
  A library, inlined by the loader (engine/scripts.py) where a script or another library says
  `--- @include "_base"`; not a script of its own.

  Rules every script follows:
  - every check happens before the first write (Redis scripts do not roll back);
  - amounts are integers far below 2^53 (engine/limits.py bounds them), so double arithmetic
    is exact; numbers are turned into strings with istr(), never tostring() (which would print
    1e+15);
  - the clock is Redis TIME unless the caller passes a positive now_ms (tests only);
  - a script that changes balance_pence or debt_pence appends the ledger entry to the org's
    outbox stream in the same call;
  - every reply starts with head(): {code, balance, held, available, debt, seq, depletion_ms},
    where depletion_ms is the org's predicted depletion moment when this script moved it (the
    caller files it in the kill switch's schedule), else 0.
]]

local rcall = redis.call

local function istr(n)
  return string.format('%d', n)
end

local function int_arg(value, name, min, max)
  local n = tonumber(value)
  if n == nil or n ~= math.floor(n) or n < min or n > max then
    error('bad argument ' .. name .. ': ' .. tostring(value))
  end
  return n
end
