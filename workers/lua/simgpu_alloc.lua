-- Allocate simulated VRAM: weights (KEYS[1]) or a job's activations (KEYS[2]), unless it would exceed
-- the GPU's total. Entries are "mib|expires_at|workload|pixels|worker|active"; expired ones are dropped first
-- (a killed worker's memory comes back by itself). Re-allocating an existing field renews it.
-- KEYS[1] weights hash   KEYS[2] jobs hash
-- ARGV[1] now (epoch s)  ARGV[2] total MiB  ARGV[3] 'weights' or 'jobs'  ARGV[4] field
-- ARGV[5] MiB  ARGV[6] expires_at  ARGV[7] workload  ARGV[8] pixels  ARGV[9] worker
-- ARGV[10] 1 if the job computes, 0 if it is paused (holds memory, no compute)
-- Returns {1, used MiB after} or {0, used MiB before} (out of memory).
local now = tonumber(ARGV[1])
local used = 0
for k = 1, 2 do
  local flat = redis.call('HGETALL', KEYS[k])
  for i = 1, #flat, 2 do
    local mib, exp = string.match(flat[i + 1], '^([^|]+)|([^|]+)')
    if tonumber(exp) < now then
      redis.call('HDEL', KEYS[k], flat[i])
    elseif not (flat[i] == ARGV[4] and ((k == 1 and ARGV[3] == 'weights') or (k == 2 and ARGV[3] == 'jobs'))) then
      used = used + tonumber(mib)
    end
  end
end
local want = tonumber(ARGV[5])
if used + want > tonumber(ARGV[2]) then return {0, used} end
local target = KEYS[1]
if ARGV[3] == 'jobs' then target = KEYS[2] end
redis.call('HSET', target, ARGV[4], ARGV[5] .. '|' .. ARGV[6] .. '|' .. ARGV[7] .. '|' .. ARGV[8] .. '|' .. ARGV[9] .. '|' .. ARGV[10])
return {1, used + want}
