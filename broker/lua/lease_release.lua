-- Release a lease if it is the caller's (same fence, or '*' for any).
-- KEYS[1] leases hash   ARGV[1] field  ARGV[2] fence or '*'
-- Returns 1 if released, 0 if it was not there or not the caller's.
local value = redis.call('HGET', KEYS[1], ARGV[1])
if not value then return 0 end
local fence = string.match(value, '|([^|]*)$')
if ARGV[2] ~= '*' and fence ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
