--[[
  Replace one org's state with a snapshot built from Postgres (the reconciler's write).
  The snapshot's idempotency records (deductions that happened, calls that were resolved,
  credits in the balance) are staged beforehand in a hash of their own (plain HSETs, any number
  of them, under the org's hash tag) and copied into the org's records here, only if the restore
  happens: a restore refused because the org is present (or has moved on) must not rewrite
  records that Redis holds newer than Postgres (a call committed here and still on its way to
  the ledger must not be set back to 'expired', or a late report would settle it twice). The
  staging hash is deleted either way.

  Input:
    KEYS[1] org hash              <prefix>:{org:<org_id>}:org
    KEYS[2] holds hash            <prefix>:{org:<org_id>}:holds
    KEYS[3] outbox stream         <prefix>:{org:<org_id>}:outbox
    KEYS[4] idempotency hash      <prefix>:{org:<org_id>}:idem
    KEYS[5] idempotency expiries  <prefix>:{org:<org_id>}:idem_exp
    KEYS[6] staged records        <prefix>:{org:<org_id>}:restore:<token>

    ARGV[1]  now_ms               0 = Redis TIME
    ARGV[2]  org_id
    ARGV[3]  mode                 'absent': only if the org hash is missing (rebuild after loss)
                                  'seq': only if the org's seq equals ARGV[4] (repair)
    ARGV[4]  expected_seq         compared in 'seq' mode
    ARGV[5]  balance_pence        -10^13 .. 10^13
    ARGV[6]  debt_pence           0 .. 10^13
    ARGV[7]  rate_pence_per_minute
    ARGV[8]  overdraft_pence
    ARGV[9]  min_start_pence
    ARGV[10] hold_block_minutes
    ARGV[11] grace_seconds
    ARGV[12] max_concurrent_calls
    ARGV[13] low_balance_threshold_pence
    ARGV[14] epoch                1 .. 2^48, random: names this restore in the org's balance alert
                                  keys ('absent' mode; 'seq' mode keeps the org's own, as seq goes on)
    ARGV[15] holds_count          how many live holds follow
    ARGV[16..] holds_count pairs (call_id, hold record)

  The staged records: field -> "<expires_ms>|<value>", one per idempotency record.

  The kill switch's burn sums are rebuilt from the restored holds, and the alerts are armed as
  if the balance had just been reached (no alert for a crossing nobody saw). depletion_ms is now
  when a live unfunded hold is among them (its call is to be ended at once).

  The outbox must be empty in both modes: entries still in it are debits Postgres does not have
  yet, and a snapshot from Postgres would silently drop them.

  Output: {code, balance_pence, held_pence, available_pence, debt_pence, seq, depletion_ms}
     0  ok
    -9  restore_conflict
]]
--- @include "_base"
--- @include "_clock"
--- @include "_org"
--- @include "_holds"
--- @include "_idem"
--- @include "_codes"

local now = clock_ms(ARGV[1])
local org_id = ARGV[2]
local mode = ARGV[3]
local expected_seq = int_arg(ARGV[4], 'expected_seq', 0, 9007199254740991)
local balance = int_arg(ARGV[5], 'balance_pence', -10000000000000, 10000000000000)
local debt = int_arg(ARGV[6], 'debt_pence', 0, 10000000000000)
local rate = int_arg(ARGV[7], 'rate_pence_per_minute', 1, 1000000)
local overdraft = int_arg(ARGV[8], 'overdraft_pence', 0, 1000000000000)
local min_start = int_arg(ARGV[9], 'min_start_pence', 1, 1000000000000)
local block = int_arg(ARGV[10], 'hold_block_minutes', 1, 60)
local grace = int_arg(ARGV[11], 'grace_seconds', 0, 300)
local max_calls = int_arg(ARGV[12], 'max_concurrent_calls', 0, 1000000)
local threshold = int_arg(ARGV[13], 'low_balance_threshold_pence', 0, 1000000000000)
local epoch = int_arg(ARGV[14], 'epoch', 1, 281474976710656)
local holds_count = int_arg(ARGV[15], 'holds_count', 0, 1000000)
local holds_end = 15 + 2 * holds_count
if #ARGV ~= holds_end then
  error('bad argument holds: holds_count pairs expected')
end
if mode ~= 'absent' and mode ~= 'seq' then
  error('bad argument mode: ' .. tostring(mode))
end

local org = org_load(KEYS[1])
if rcall('XLEN', KEYS[3]) > 0 or (mode == 'absent' and org ~= nil)
    or (mode == 'seq' and (org == nil or org.seq ~= expected_seq)) then
  rcall('DEL', KEYS[6])
  return head(CODE_RESTORE_CONFLICT, org)
end

local held = 0
local burn = {burn_rate = 0, burn_k = 0, burn_at_s = math.floor(now / 1000), burn_frozen_pence = 0}
for i = 16, holds_end, 2 do
  local h = hold_decode(ARGV[i + 1])
  held = held + h.hold_pence
  burn_add(burn, h, now)
end

rcall('DEL', KEYS[2])
for i = 16, holds_end, 2 do
  rcall('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
local staged = rcall('HGETALL', KEYS[6])
for i = 1, #staged, 2 do
  local expires, value = string.match(staged[i + 1], '^(%d+)|(.*)$')
  if expires == nil then
    error('corrupt staged record: ' .. staged[i + 1])
  end
  idem_put(KEYS[4], KEYS[5], staged[i], value, expires)
end
rcall('DEL', KEYS[6])
local seq = expected_seq + 1
if org == nil then
  seq = 1
else
  epoch = org.epoch
end
rcall('HSET', KEYS[1],
  'balance_pence', istr(balance), 'held_pence', istr(held), 'debt_pence', istr(debt),
  'seq', istr(seq),
  'rate_pence_per_minute', istr(rate), 'overdraft_pence', istr(overdraft),
  'min_start_pence', istr(min_start), 'hold_block_minutes', istr(block),
  'grace_seconds', istr(grace), 'max_concurrent_calls', istr(max_calls),
  'burn_rate', istr(burn.burn_rate), 'burn_k', istr(burn.burn_k),
  'burn_at_s', istr(burn.burn_at_s), 'burn_frozen_pence', istr(burn.burn_frozen_pence),
  'low_balance_threshold_pence', istr(threshold), 'epoch', istr(epoch))
local available = balance - held
local low_sent, exhausted_sent = '0', '0'
if available < threshold then
  low_sent = '1'
end
if available <= 0 then
  exhausted_sent = '1'
end
rcall('HSET', KEYS[1], 'alert_low_sent', low_sent, 'alert_exhausted_sent', exhausted_sent)
local restored = org_load(KEYS[1])
restored.deadline_moved = true
local reply = head(CODE_OK, restored)
for i = 16, holds_end, 2 do
  local h = hold_decode(ARGV[i + 1])
  if h.max_duration_s == 0 and h.ended_ms == 0 then
    reply[7] = now  -- a live unfunded hold (hold_reserve.lua): the kill switch must visit at once
  end
end
return reply
