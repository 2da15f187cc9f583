-- A run ends (finished, preempted, failed, cancelled), all or nothing, and only if the caller still owns
-- the job: its state is one of the allowed ones and its record names the caller's fence. In one step: the
-- blob (the output, or a preemption's checkpoint), the record's fields, each state of the chain (one event
-- each), the job's VRAM lease (if it still carries this fence), the arbiter's control for it, for a
-- terminal end the record's TTL, the checkpoint dropped and the fence counter's TTL — and the run's side
-- writes (its counters, histograms, predictor: `broker.scriptops`), only when the end is recorded.
-- The blob is written first: under Redis `maxmemory` (noeviction) the script is refused before any write,
-- so a job is never finished without its output.
-- KEYS[1] job hash  KEYS[2] events stream  KEYS[3] live-jobs zset  KEYS[4] running-jobs set
-- KEYS[5] leases hash of the GPU  KEYS[6] controls hash of the GPU  KEYS[7] blob key (output or checkpoint)
-- KEYS[8] the job's checkpoint  KEYS[9] the job's fence counter  KEYS[10..] the side writes' keys
-- ARGV[1] states to pass through, comma separated (e.g. 'preempted,queued'; the last is the final one)
-- ARGV[2] allowed current states, comma separated  ARGV[3] now  ARGV[4] 1 if the final state is terminal
-- ARGV[5] ttl_s of a terminal record  ARGV[6] stream maxlen  ARGV[7] job id  ARGV[8] owner fence
-- ARGV[9] blob TTL s (0: no blob)  ARGV[10] blob  ARGV[11] n = field, value pairs ('+name' increments)
-- ARGV[12 .. 11+2n] the pairs  ARGV[12+2n ..] side writes (job_lib's `side_writes`)
-- Returns {1, final state, {side writes' replies}} | {0, current state, 'state' | 'fence'} (current is ''
-- with no record).
-- #include job_lib
local current = redis.call('HGET', KEYS[1], 'state')
if not current then return {0, '', 'state'} end
if not state_in(current, ARGV[2]) then return {0, current, 'state'} end
if redis.call('HGET', KEYS[1], 'fence') ~= ARGV[8] then return {0, current, 'fence'} end
if tonumber(ARGV[9]) > 0 then
  redis.call('SET', KEYS[7], ARGV[10], 'EX', ARGV[9])
end
local last = 11 + 2 * tonumber(ARGV[11])
local from, final = current, current
for s in string.gmatch(ARGV[1], '[^,]+') do
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 'type', 'state', 'state', s, 'from', from)
  from, final = s, s
end
write_fields(KEYS[1], 12, last, {'state', final, 'updated_at', ARGV[3]})
if redis.call('TTL', KEYS[2]) < 0 then
  redis.call('EXPIRE', KEYS[2], math.max(redis.call('TTL', KEYS[1]), 1))
end
redis.call('SREM', KEYS[4], ARGV[7])
local lease = redis.call('HGET', KEYS[5], ARGV[7])
if lease and string.match(lease, '|([^|]*)$') == ARGV[8] then
  redis.call('HDEL', KEYS[5], ARGV[7])
end
redis.call('HDEL', KEYS[6], ARGV[7])
if ARGV[4] == '1' then terminal(KEYS[1], KEYS[2], KEYS[3], KEYS[8], KEYS[9], ARGV[7], ARGV[5]) end
return {1, final, side_writes(last + 1, 9)}
