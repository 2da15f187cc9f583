-- Adopt a finished improvement run's result as its job's version 2, in one step.
-- KEYS[1] job hash   KEYS[2] run hash   KEYS[3] job output   KEYS[4] job output v1   KEYS[5] run output
-- KEYS[6] job event stream
-- ARGV[1] run id     ARGV[2] job id     ARGV[3] now          ARGV[4] stream maxlen
-- Returns 1 when adopted; 0 when the job does not name this run as its improvement, was cancelled (even
-- after it finished), ended otherwise than finished, or the run has no result; -1 while the job has not
-- finished yet.
if redis.call('HGET', KEYS[1], 'improvement') ~= ARGV[1] then return 0 end
if redis.call('HEXISTS', KEYS[1], 'cancel_requested') == 1 then return 0 end   -- cancelled: the result stays
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'failed' or state == 'cancelled' then return 0 end
if state ~= 'finished' then return -1 end
local new = redis.call('HGET', KEYS[2], 'result')
if not new then return 0 end
local old = redis.call('HGET', KEYS[1], 'result')
if old then redis.call('HSET', KEYS[1], 'result_v1', old) end
local ttl = redis.call('PTTL', KEYS[1])
if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('RENAME', KEYS[3], KEYS[4]) end   -- keeps its TTL
if redis.call('EXISTS', KEYS[5]) == 1 then
  redis.call('COPY', KEYS[5], KEYS[3], 'REPLACE')
  if ttl > 0 then redis.call('PEXPIRE', KEYS[3], ttl) end
end
local r = cjson.decode(new)
r['job_id'] = ARGV[2]
r['version'] = 2
r['improved_at'] = tonumber(ARGV[3])
r['improved_by'] = ARGV[1]
redis.call('HSET', KEYS[1], 'result', cjson.encode(r), 'improved_at', ARGV[3], 'improvement_state', 'done',
           'quality', tostring(r['quality']))
redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[4], '*', 'type', 'improved', 'quality', tostring(r['quality']),
           'improved_by', ARGV[1])
return 1
