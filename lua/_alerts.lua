--[[
  Alerts for the org's webhook, appended to its outbox: the low-balance and exhausted
  crossings (once each until a credit re-arms them) and per-call alerts.
]]
--- @include "_base"

-- The key of a balance alert: once per change of the org. seq starts again at 1 when a lost org
-- is rebuilt from Postgres, so the key carries the restore's epoch too (a later crossing's alert
-- must not be taken for an earlier one's and dropped as a duplicate).
local function balance_alert_key(org_id, kind, epoch, seq)
  return 'alert:' .. org_id .. ':' .. kind .. ':' .. istr(epoch) .. '.' .. istr(seq)
end

-- An alert for the org's webhook (delivered by the worker from Postgres's alert_events). Its key
-- makes it once per call for a call's alert, once per change for a balance alert.
local function outbox_alert(stream, org_id, org, kind, call_id, now_ms)
  local key = 'alert:' .. org_id .. ':' .. kind .. ':' .. (call_id or '')
  if call_id == nil then
    key = balance_alert_key(org_id, kind, org.epoch, org.seq)
  end
  rcall('XADD', stream, '*',
    't', 'A', 'o', org_id, 'k', key,
    'kind', kind, 'c', call_id or '',
    'b', istr(org.balance_pence), 'av', istr(org.balance_pence - org.held_pence),
    'th', istr(org.low_balance_threshold_pence), 'ms', istr(now_ms), 's', istr(org.seq))
end

-- After a debit or a hold: one alert per downward crossing of the low-balance threshold and
-- of zero. Only a credit re-arms them (alerts_rearm), so a balance hovering at the threshold as
-- holds come and go does not flap.
local function alerts_after_debit(key, stream, org_id, org, now_ms)
  local available = org.balance_pence - org.held_pence
  if org.low_balance_threshold_pence > 0 and org.alert_low_sent == 0
      and available < org.low_balance_threshold_pence then
    org.alert_low_sent = 1
    rcall('HSET', key, 'alert_low_sent', '1')
    outbox_alert(stream, org_id, org, 'low_balance', nil, now_ms)
  end
  if org.alert_exhausted_sent == 0 and available <= 0 then
    org.alert_exhausted_sent = 1
    rcall('HSET', key, 'alert_exhausted_sent', '1')
    outbox_alert(stream, org_id, org, 'balance_exhausted', nil, now_ms)
  end
end

local function alerts_rearm(key, org)
  local available = org.balance_pence - org.held_pence
  if org.alert_low_sent == 1 and available >= org.low_balance_threshold_pence then
    org.alert_low_sent = 0
    rcall('HSET', key, 'alert_low_sent', '0')
  end
  if org.alert_exhausted_sent == 1 and available > 0 then
    org.alert_exhausted_sent = 0
    rcall('HSET', key, 'alert_exhausted_sent', '0')
  end
end
