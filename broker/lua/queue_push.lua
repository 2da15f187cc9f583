-- A job's message onto its Celery queue, counted (the producer's transport, in place of kombu's LPUSH; see
-- broker/position.py): the message at the left end, the queue's push count up by one, and that count as the
-- record's `qseq`, in one step. A job's place from the right end is then qseq - pushed + LLEN, read in O(1)
-- (position.lua), as long as every push at the left is counted and workers pop from the right.
-- KEYS[1] the queue  KEYS[2] the push counts (hash: queue -> messages ever pushed)  KEYS[3] the job hash
-- ARGV[1] the message  ARGV[2] the queue's field in KEYS[2]
-- Returns the queue's length after the push.
local n = redis.call('LPUSH', KEYS[1], ARGV[1])
local seq = redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('HSET', KEYS[3], 'qseq', seq)
end
return n
