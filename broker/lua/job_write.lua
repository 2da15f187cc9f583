-- A running job's own write (progress, a token, a checkpoint), accepted only from its current owner: the
-- job is running or paused and its record names the caller's fence. A stale run (its worker stopped past
-- the lease TTL while another took the job over) writes nothing.
-- KEYS[1] job hash   KEYS[2] job events stream   KEYS[3] blob key (the checkpoint; unused without a blob)
-- ARGV[1] owner fence   ARGV[2] stream maxlen   ARGV[3] blob TTL s (0: no blob)   ARGV[4] blob
-- ARGV[5] n = number of hash field/value pairs   ARGV[6 .. 5+2n] the pairs   ARGV[6+2n ..] event field/value
--   pairs (none: no event)
-- Returns 1 if written, 0 if refused (the caller no longer owns the job).
local state = redis.call('HGET', KEYS[1], 'state')
if (state ~= 'running' and state ~= 'paused') or redis.call('HGET', KEYS[1], 'fence') ~= ARGV[1] then
  return 0
end
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[3], ARGV[4], 'EX', ARGV[3])
end
local n = tonumber(ARGV[5])
for i = 6, 5 + 2 * n, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
if #ARGV >= 6 + 2 * n then
  local event = {}
  for i = 6 + 2 * n, #ARGV do event[#event + 1] = ARGV[i] end
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(event))
end
return 1
