--[[
  Read everything the reconciler compares with Postgres for one org, at one instant, changing
  nothing. A script, not MULTI, because Redis Cluster clients cannot send MULTI.

  Input:
    KEYS[1] org hash              <prefix>:{org:<org_id>}:org
    KEYS[2] holds hash            <prefix>:{org:<org_id>}:holds
    KEYS[3] outbox stream         <prefix>:{org:<org_id>}:outbox
    KEYS[4] dead-letter stream    <prefix>:{org:<org_id>}:outbox:dead
    KEYS[5] idempotency hash      <prefix>:{org:<org_id>}:idem

    ARGV[1] field_count           how many org hash fields follow
    ARGV[2..] fields, then idempotency keys whose presence to report (pending credits)

  The org's call-resolution records are read by the reconciler with HSCAN, outside this script:
  a week of them in one script would hold Redis up for every other client.

  Output: {code, field values, holds (flat call_id, record), outbox entries, dead letters, pending}
     0  ok
    -2  org_unknown               (the org hash is missing; the rest is read all the same)
]]
--- @include "_codes"

local field_count = tonumber(ARGV[1])
local fields = {}
local pending = {}
for i = 2, #ARGV do
  if i <= field_count + 1 then
    fields[#fields + 1] = ARGV[i]
  else
    pending[#pending + 1] = ARGV[i]
  end
end
local code = CODE_OK
if redis.call('EXISTS', KEYS[1]) == 0 then
  code = CODE_ORG_UNKNOWN
end
local present = {}
if #pending > 0 then
  present = redis.call('HMGET', KEYS[5], unpack(pending))
end
return {
  code,
  redis.call('HMGET', KEYS[1], unpack(fields)),
  redis.call('HGETALL', KEYS[2]),
  redis.call('XRANGE', KEYS[3], '-', '+'),
  redis.call('XLEN', KEYS[4]),
  present,
}
