-- A run starts, all or nothing: the job's VRAM lease (lease_acquire.lua's rules: never oversubscribe,
-- expired leases dropped, one holder per job id) and its transition to running (job_transition.lua's: only
-- from an allowed state, one event), with a new fence in the lease and the record, and the start's side
-- writes (counters: `broker.scriptops`). Nothing is written unless the job may start and its lease fits.
-- KEYS[1] job hash  KEYS[2] job events stream  KEYS[3] running-jobs set  KEYS[4] leases hash of the GPU
-- KEYS[5] the job's fence counter  KEYS[6..] the side writes' keys
-- ARGV[1] now  ARGV[2] capacity MiB  ARGV[3] job id  ARGV[4] job MiB  ARGV[5] lease ttl s  ARGV[6] priority
-- ARGV[7] workload  ARGV[8] holder (the process)  ARGV[9] weights field ('' for none)  ARGV[10] weights MiB
-- ARGV[11] states it may start from, comma separated  ARGV[12] stream maxlen
-- ARGV[13] n = field, value pairs ('+name' increments, '?name' set if unset)  ARGV[14 .. 13+2n] the pairs
-- ARGV[14+2n ..] side writes (job_lib's `side_writes`)
-- Returns {1, fence, free MiB after, {side writes' replies}} | {0, 0, free MiB now} (no room)
--   | {-1, 0, 0} (its live lease names another holder) | {-2, 0, 0, current state} (it may not start; '':
--   no record)
-- #include job_lib
local current = redis.call('HGET', KEYS[1], 'state')
if not current or not state_in(current, ARGV[11]) then return {-2, 0, 0, current or ''} end
local granted, fence, free = lease_take(KEYS[4], KEYS[5])
if granted ~= 1 then return {granted, 0, free} end
local last = 13 + 2 * tonumber(ARGV[13])
write_fields(KEYS[1], 14, last, {'state', 'running', 'updated_at', ARGV[1], 'fence', fence})
state_event(KEYS[2], KEYS[1], ARGV[12], 'running', current)
redis.call('SADD', KEYS[3], ARGV[3])
return {1, fence, free, side_writes(last + 1, 5)}
