-- A leading beat that is told to stop (SIGTERM) hands over leadership at once: its lock and its published
-- policy go, only if the lock is still its own (a lock that expired and was taken by another beat stays), and
-- a standby waiting on the handover list is woken to take the lock now rather than at its next tick.
-- KEYS[1] leader lock  KEYS[2] leader's policy  KEYS[3] handover list
-- ARGV[1] the resigning beat's token  ARGV[2] the handover list's TTL in ms (no standby: it expires)
-- Returns 1 if it held the lock and let it go, 0 if the lock was not its own.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('DEL', KEYS[3])
redis.call('LPUSH', KEYS[3], ARGV[1])
redis.call('PEXPIRE', KEYS[3], ARGV[2])
return 1
