--[[
  Move one outbox entry the ledger cannot take (its writer refused it: a duplicate decision, a
  value Postgres rejects) to the org's dead-letter stream, so the entries behind it can be
  written. Nothing is dropped: the entry and the reason stay in the dead-letter stream until the
  reconciler's repair has rewritten the org from Postgres and archived them in ledger_rejects.

  Input:
    KEYS[1] outbox stream         <prefix>:{org:<org_id>}:outbox
    KEYS[2] dead-letter stream    <prefix>:{org:<org_id>}:outbox:dead

    ARGV[1] stream_id             the entry's id in the outbox
    ARGV[2] reason                why the writer refused it

  Output: {code}
     0  ok
   -10  entry_not_found
]]
--- @include "_codes"
local entries = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #entries == 0 then
  return {CODE_ENTRY_NOT_FOUND}
end
local fields = entries[1][2]
fields[#fields + 1] = 'outbox_id'
fields[#fields + 1] = ARGV[1]
fields[#fields + 1] = 'reason'
fields[#fields + 1] = string.sub(ARGV[2], 1, 500)
redis.call('XADD', KEYS[2], '*', unpack(fields))
redis.call('XDEL', KEYS[1], ARGV[1])
return {CODE_OK}
