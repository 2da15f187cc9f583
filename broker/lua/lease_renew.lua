-- Extend a live lease, only if it is still the caller's (same fence). A lease that expired or was
-- taken over is not revived: the caller has lost it and must stop.
-- KEYS[1] leases hash   ARGV[1] now  ARGV[2] ttl s  ARGV[3] field  ARGV[4] fence ('*' for weights)
-- Returns 1 if renewed, 0 if the lease is gone or not the caller's.
local value = redis.call('HGET', KEYS[1], ARGV[3])
if not value then return 0 end
local mib, exp, rest, fence = string.match(value, '^([^|]*)|([^|]*)|(.*)|([^|]*)$')
if tonumber(exp) < tonumber(ARGV[1]) then
  redis.call('HDEL', KEYS[1], ARGV[3])
  return 0
end
if ARGV[4] ~= '*' and fence ~= ARGV[4] then return 0 end
redis.call('HSET', KEYS[1], ARGV[3], mib .. '|' .. (tonumber(ARGV[1]) + tonumber(ARGV[2])) .. '|' .. rest .. '|' .. fence)
return 1
