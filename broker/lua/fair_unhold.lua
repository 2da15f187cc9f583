-- An operator bumps a held job: its message (exact bytes) out of its tenant's held list and onto the front of
-- the band's Celery queue (the right end: next to be taken), the held count down, the tenant out of the ring
-- if it has nothing left, the record's `held` mark dropped — in one step.
-- KEYS[1] the tenant's held list  KEYS[2] the band's ring  KEYS[3] the ring's members  KEYS[4] the held count
-- KEYS[5] the job hash  KEYS[6] the band's Celery queue
-- ARGV[1] the message  ARGV[2] tenant  ARGV[3] now
-- Returns 1, or 0 when the message was not there any more (fed or taken meanwhile).
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('RPUSH', KEYS[6], ARGV[1])
redis.call('DECR', KEYS[4])
if redis.call('LLEN', KEYS[1]) == 0 then
  redis.call('LREM', KEYS[2], 0, ARGV[2])
  redis.call('SREM', KEYS[3], ARGV[2])
end
redis.call('HDEL', KEYS[5], 'held')
redis.call('HSET', KEYS[5], 'fed_at', ARGV[3])
return 1
