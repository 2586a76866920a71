--[[
  Hold records and call resolution records, and how a hold moves the org's burn sums.
]]
--- @include "_base"
--- @include "_money"
--- @include "_burn"

-- Hold records:
-- "hold_pence|rate|created_ms|started_ms|last_seen_ms|expires_ms|max_duration_s|version|ended_ms"
-- started_ms and ended_ms are 0 until the call starts / ends.

local function hold_decode(text)
  local p, r, c, s, l, e, d, v, x = string.match(text,
    '^(%d+)|(%d+)|(%d+)|(%d+)|(%d+)|(%d+)|(%d+)|(%d+)|(%d+)$')
  if p == nil then
    error('corrupt hold record: ' .. text)
  end
  return {
    hold_pence = tonumber(p), rate = tonumber(r), created_ms = tonumber(c),
    started_ms = tonumber(s), last_seen_ms = tonumber(l), expires_ms = tonumber(e),
    max_duration_s = tonumber(d), version = tonumber(v), ended_ms = tonumber(x),
  }
end

local function hold_encode(h)
  return table.concat({
    istr(h.hold_pence), istr(h.rate), istr(h.created_ms), istr(h.started_ms),
    istr(h.last_seen_ms), istr(h.expires_ms), istr(h.max_duration_s), istr(h.version),
    istr(h.ended_ms),
  }, '|')
end

-- The last moment a call is known to have run: its end if it ended, else when last seen.
local function hold_known_until_ms(h)
  if h.ended_ms > 0 then
    return h.ended_ms
  end
  return h.last_seen_ms
end

-- The second from which a hold's call burns: its start, else its reservation.
local function hold_burn_from_s(h)
  if h.started_ms > 0 then
    return math.floor(h.started_ms / 1000)
  end
  return math.floor(h.created_ms / 1000)
end

-- What an ended call has cost (its clock is stopped); 0 if it never started.
local function hold_frozen_pence(h)
  if h.started_ms == 0 or h.ended_ms <= h.started_ms then
    return 0
  end
  return cost_pence(billed_seconds_from_ms(h.ended_ms - h.started_ms), h.rate)
end

-- A call begins to burn (a reservation, a restored hold).
local function burn_add(org, h, now_ms)
  burn_advance(org, now_ms)
  if h.ended_ms > 0 then
    org.burn_frozen_pence = org.burn_frozen_pence + hold_frozen_pence(h)
  else
    org.burn_rate = org.burn_rate + h.rate
    org.burn_k = org.burn_k + h.rate * (org.burn_at_s - hold_burn_from_s(h))
  end
  org.burn_changed = true
end

-- A hold goes away (commit, release, expiry): it stops counting, whatever state it was in.
local function burn_remove(org, h, now_ms)
  burn_advance(org, now_ms)
  if h.ended_ms > 0 then
    org.burn_frozen_pence = org.burn_frozen_pence - hold_frozen_pence(h)
  else
    org.burn_rate = org.burn_rate - h.rate
    org.burn_k = org.burn_k - h.rate * (org.burn_at_s - hold_burn_from_s(h))
  end
  org.burn_changed = true
end

-- Call resolution records: "status|charged_pence|billed_seconds|rate"

local function call_state_decode(text)
  local status, charged, billed, rate = string.match(text, '^(%a+)|(%d+)|(%d+)|(%d+)$')
  if status == nil then
    error('corrupt call state record: ' .. text)
  end
  return {status = status, charged_pence = tonumber(charged),
          billed_seconds = tonumber(billed), rate = tonumber(rate)}
end

local function call_state_encode(status, charged, billed, rate)
  return status .. '|' .. istr(charged) .. '|' .. istr(billed) .. '|' .. istr(rate)
end
