-- Fair share within a band (broker/fairshare.py), in one step each:
--   'hold' (the producer's transport, in place of kombu's LPUSH onto the band's queue): the message — Celery's
--     own bytes for the band — onto its tenant's held list; the tenant into the band's round-robin ring if it
--     was not in it; the held count up; the record's `held` mark (no sweep sends it another message); then feed.
--   'feed' (a worker that finished a batch job, the beat each tick): move held messages onto the band's queue
--     until it holds `target` messages, the tenant at the ring's head giving its oldest (the right end of its
--     list) and going to the back while it has more. Bytes move unchanged. A message whose job is no longer
--     queued (cancelled while held) is dropped and gives its turn away; one whose record is gone moves on.
-- The target is the beat's (KEYS[5]: about ARBITER_FAIR_SHARE_DEPTH messages per worker slot of the workload,
-- 0 while the queue is paused), or ARGV[5] when no beat has set one.
-- KEYS[1] ring  KEYS[2] ring members  KEYS[3] held count  KEYS[4] the band's Celery queue  KEYS[5] target
-- KEYS[6] the tenant's held list ('hold')  KEYS[7] the job hash ('hold')
-- ARGV[1] 'hold' | 'feed'  ARGV[2] prefix of the tenants' held lists  ARGV[3] prefix of job keys  ARGV[4] now
-- ARGV[5] default target  ARGV[6] message ('hold')  ARGV[7] tenant ('hold')  ARGV[8] '<queue>|<tenant>' ('hold')
-- Returns the number of messages moved onto the band's queue.
if ARGV[1] == 'hold' then
  redis.call('LPUSH', KEYS[6], ARGV[6])
  redis.call('INCR', KEYS[3])
  redis.call('HSET', KEYS[7], 'held', ARGV[8])
  if redis.call('SADD', KEYS[2], ARGV[7]) == 1 then
    redis.call('RPUSH', KEYS[1], ARGV[7])
  end
end
local target = tonumber(redis.call('GET', KEYS[5]) or ARGV[5])
local want = target - redis.call('LLEN', KEYS[4])
local moved, turns = 0, 0
while moved < want and turns < 100000 do
  turns = turns + 1
  local tenant = redis.call('LPOP', KEYS[1])
  if not tenant then break end
  local list = ARGV[2] .. tenant
  local msg = redis.call('RPOP', list)
  if msg then
    redis.call('DECR', KEYS[3])
    local ok, envelope = pcall(cjson.decode, msg)
    local id = ok and type(envelope) == 'table' and type(envelope['headers']) == 'table' and envelope['headers']['id']
    local key = type(id) == 'string' and (ARGV[3] .. id) or nil
    local state = key and redis.call('HGET', key, 'state')
    if not state or state == 'queued' then
      if state then
        redis.call('HDEL', key, 'held')
        redis.call('HSET', key, 'fed_at', ARGV[4])
      end
      redis.call('LPUSH', KEYS[4], msg)
      moved = moved + 1
    end
  end
  if redis.call('LLEN', list) > 0 then
    redis.call('RPUSH', KEYS[1], tenant)
  else
    redis.call('SREM', KEYS[2], tenant)
  end
end
if tonumber(redis.call('GET', KEYS[3]) or '0') < 0 then
  redis.call('SET', KEYS[3], 0)
end
return moved
