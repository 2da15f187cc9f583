-- Drop the expired leases of one GPU (those of a dead worker's resident weights above all: no acquire on that
-- GPU may come to drop them). Swept by the beat every few seconds; the acquire scripts drop them too.
-- Lease value: "mib|expires_at|kind|priority|workload|worker|fence"
-- KEYS[1] leases hash of the GPU
-- ARGV[1] now (Redis' clock, `broker.clock`)
-- Returns the number of leases dropped.
local now, dropped = tonumber(ARGV[1]), 0
local flat = redis.call('HGETALL', KEYS[1])
for i = 1, #flat, 2 do
  local exp = tonumber(string.match(flat[i + 1], '^[^|]*|([^|]*)|'))
  if exp == nil or exp < now then
    redis.call('HDEL', KEYS[1], flat[i])
    dropped = dropped + 1
  end
end
return dropped
