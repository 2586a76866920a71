--[[
  Set an existing org's settings in Redis (Postgres already holds them: settings are
  Postgres-first). Changes no money, but bumps seq so a concurrent repair notices.

  Input:
    KEYS[1] org hash              <prefix>:{org:<org_id>}:org

    ARGV[1] now_ms                0 = Redis TIME
    ARGV[2] org_id
    ARGV[3] rate_pence_per_minute 1 .. 10^6
    ARGV[4] overdraft_pence       0 .. 10^12
    ARGV[5] min_start_pence       1 .. 10^12
    ARGV[6] hold_block_minutes    1 .. 60
    ARGV[7] grace_seconds         0 .. 300
    ARGV[8] max_concurrent_calls  0 (no limit) .. 10^6
    ARGV[9] low_balance_threshold_pence  0 (no alert) .. 10^12; a new threshold arms its alert
                                  only if available credit is at or above it now

  Output: {code, balance_pence, held_pence, available_pence, debt_pence, seq, depletion_ms}
     0  ok
    -2  org_unknown
]]
--- @include "_base"
--- @include "_clock"
--- @include "_org"
--- @include "_codes"

clock_ms(ARGV[1])
local org_id = ARGV[2]
local rate = int_arg(ARGV[3], 'rate_pence_per_minute', 1, 1000000)
local overdraft = int_arg(ARGV[4], 'overdraft_pence', 0, 1000000000000)
local min_start = int_arg(ARGV[5], 'min_start_pence', 1, 1000000000000)
local block = int_arg(ARGV[6], 'hold_block_minutes', 1, 60)
local grace = int_arg(ARGV[7], 'grace_seconds', 0, 300)
local max_calls = int_arg(ARGV[8], 'max_concurrent_calls', 0, 1000000)
local threshold = int_arg(ARGV[9], 'low_balance_threshold_pence', 0, 1000000000000)

local org = org_load(KEYS[1])
if org == nil then
  return head(CODE_ORG_UNKNOWN, nil)
end

org.seq = org.seq + 1
rcall('HSET', KEYS[1],
  'rate_pence_per_minute', istr(rate), 'overdraft_pence', istr(overdraft),
  'min_start_pence', istr(min_start), 'hold_block_minutes', istr(block),
  'grace_seconds', istr(grace), 'max_concurrent_calls', istr(max_calls),
  'seq', istr(org.seq))
if threshold ~= org.low_balance_threshold_pence then
  local below = '0'
  if org.balance_pence - org.held_pence < threshold then
    below = '1'
  end
  rcall('HSET', KEYS[1], 'low_balance_threshold_pence', istr(threshold), 'alert_low_sent', below)
end
return head(CODE_OK, org)
