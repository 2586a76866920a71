--[[
  The org's outbox stream: room left, ledger entries and hold events (drained to Postgres by
  the worker; engine/outbox.py).
]]
--- @include "_base"
--- @include "_holds"

local function outbox_has_room(stream, outbox_max)
  return rcall('XLEN', stream) < outbox_max
end

-- A ledger entry. amount is the change to balance_pence, debt_delta the change to debt_pence.
local function outbox_ledger(stream, org_id, org, e, now_ms)
  rcall('XADD', stream, '*',
    't', 'L', 'o', org_id, 'k', e.key, 'kind', e.kind,
    'a', istr(e.amount), 'dd', istr(e.debt_delta),
    'b', istr(org.balance_pence), 'db', istr(org.debt_pence),
    'c', e.call_id or '', 'bs', istr(e.billed_seconds or 0), 'r', istr(e.rate or 0),
    'fp', e.fingerprint or '', 'm', e.meta or '',
    'ms', istr(now_ms), 's', istr(org.seq))
end

-- A hold event: the call's hold as it now stands, for the Postgres call_holds table.
local function outbox_hold(stream, org_id, org, call_id, status, h, charged, billed, now_ms)
  rcall('XADD', stream, '*',
    't', 'H', 'o', org_id, 'c', call_id, 'st', status, 'h', hold_encode(h),
    'ch', istr(charged), 'bs', istr(billed), 'ms', istr(now_ms), 's', istr(org.seq))
end
