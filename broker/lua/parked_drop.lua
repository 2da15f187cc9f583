-- Remove a parked job's entry only if it is still the one the caller read (a worker that parked the job
-- again meanwhile wrote a new one, which must stay).
-- KEYS[1] parked hash
-- ARGV[1] job id   ARGV[2] the entry as read
-- Returns 1 if removed.
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('HDEL', KEYS[1], ARGV[1]) end
return 0
