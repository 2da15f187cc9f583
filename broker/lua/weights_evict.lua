-- Evict a worker's resident weights from the ledger, unless a live job of that worker runs the variant now
-- (checked and dropped in one step: a job that started on them a moment ago keeps them).
-- KEYS[1] leases hash of the GPU
-- ARGV[1] now  ARGV[2] weights field ('w:<worker>|<variant>')  ARGV[3] worker  ARGV[4] variant
-- Returns 1 evicted (or not held), 0 in use by a running job
local now, prefix = tonumber(ARGV[1]), ARGV[3] .. '/'
local flat = redis.call('HGETALL', KEYS[1])
for i = 1, #flat, 2 do
  local exp, kind, holder, variant = string.match(flat[i + 1], '^[^|]*|([^|]*)|([^|]*)|[^|]*|[^|]*|([^|]*)|([^|]*)|[^|]*$')
  if kind == 'job' and tonumber(exp) >= now and variant == ARGV[4]
      and string.sub(holder, 1, #prefix) == prefix then
    return 0
  end
end
redis.call('HDEL', KEYS[1], ARGV[2])
return 1
