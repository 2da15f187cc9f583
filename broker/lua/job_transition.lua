-- Move a job to a new state if, and only if, its current state is one of the allowed ones (and, when an
-- owner fence is given, the record still names that fence: a stale run moves nothing).
-- KEYS[1] job hash   KEYS[2] job events stream   KEYS[3] live-jobs sorted set   KEYS[4] running-jobs set
-- KEYS[5] the job's checkpoint   KEYS[6] the job's fence counter
-- ARGV[1] new state  ARGV[2] allowed current states, comma separated  ARGV[3] now (epoch s)
-- ARGV[4] 1 if the new state is terminal  ARGV[5] ttl_s for a terminal record  ARGV[6] stream maxlen
-- ARGV[7] job id     ARGV[8] 1 if the new state is running or paused   ARGV[9] owner fence ('' for none)
-- ARGV[10..] field, value pairs
--   (a field named '+name' is incremented by the value; '?name' is set only if it has no value yet)
-- A terminal state drops the checkpoint (nothing resumes a finished, failed or cancelled job) and gives the
-- fence counter the record's TTL, so nothing of the job outlives its record.
-- Returns {1, new state} or {0, current state} (current is '' when the record does not exist).
-- #include job_lib
local current = redis.call('HGET', KEYS[1], 'state')
if not current then return {0, ''} end
if not state_in(current, ARGV[2]) then return {0, current} end
if ARGV[9] ~= '' and redis.call('HGET', KEYS[1], 'fence') ~= ARGV[9] then return {0, current} end
write_fields(KEYS[1], 10, #ARGV, {'state', ARGV[1], 'updated_at', ARGV[3]})
state_event(KEYS[2], KEYS[1], ARGV[6], ARGV[1], current)
if ARGV[8] == '1' then
  redis.call('SADD', KEYS[4], ARGV[7])
else
  redis.call('SREM', KEYS[4], ARGV[7])
end
if ARGV[4] == '1' then terminal(KEYS[1], KEYS[2], KEYS[3], KEYS[5], KEYS[6], ARGV[7], ARGV[5]) end
return {1, ARGV[1]}
