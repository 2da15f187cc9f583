-- Grant a VRAM lease to a job on one GPU, atomically, or refuse. Never oversubscribes: the sum of live
-- leases (jobs and resident weights) stays <= capacity. Expired leases are dropped first, so a killed
-- worker's memory comes back by itself. A job already holding a live lease for another worker is refused
-- (fencing: one job id never runs twice at once).
-- Lease value: "mib|expires_at|kind|priority|workload|worker|fence"
-- KEYS[1] leases hash of the GPU   KEYS[2] the job's fence counter
-- ARGV[1] now  ARGV[2] capacity MiB  ARGV[3] job id  ARGV[4] job MiB  ARGV[5] ttl s  ARGV[6] priority
-- ARGV[7] workload  ARGV[8] holder (the process)  ARGV[9] weights field ('' for none)  ARGV[10] weights MiB
-- Returns {1, fence, free MiB after} | {0, 0, free MiB now} | {-1, 0, 0} (held by another worker)
local now = tonumber(ARGV[1])
local used = 0
local flat = redis.call('HGETALL', KEYS[1])
local weights_held = false
for i = 1, #flat, 2 do
  local field, value = flat[i], flat[i + 1]
  local mib, exp, kind, prio, wl, worker = string.match(value, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|')
  if tonumber(exp) < now then
    redis.call('HDEL', KEYS[1], field)
  elseif field == ARGV[3] then
    if worker ~= ARGV[8] then return {-1, 0, 0} end
  else
    if field == ARGV[9] then weights_held = true end
    used = used + tonumber(mib)
  end
end
local need = tonumber(ARGV[4])
if ARGV[9] ~= '' and not weights_held then need = need + tonumber(ARGV[10]) end
local capacity = tonumber(ARGV[2])
if used + need > capacity then return {0, 0, capacity - used} end
local fence = redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], 86400 * 7)
local expires = now + tonumber(ARGV[5])
redis.call('HSET', KEYS[1], ARGV[3], ARGV[4] .. '|' .. expires .. '|job|' .. ARGV[6] .. '|' .. ARGV[7] .. '|' .. ARGV[8] .. '|' .. fence)
if ARGV[9] ~= '' then
  redis.call('HSET', KEYS[1], ARGV[9], ARGV[10] .. '|' .. expires .. '|weights|-|' .. ARGV[7] .. '|' .. ARGV[8] .. '|0')
end
return {1, fence, capacity - used - need}
