-- A job's record is created, unless an operator drained its queue: the check and the write in one step (a
-- drain cannot slip between them) and one round trip at submit.
-- KEYS[1] job hash  KEYS[2] live-jobs zset  KEYS[3] the queues' controls hash (broker.controls)
-- ARGV[1] job id  ARGV[2] now  ARGV[3] the record's TTL s while live  ARGV[4] the job's queue ('': no check)
-- ARGV[5 ..] the record's field, value pairs
-- Returns false when created (or already there: a step sent again after its reply was lost — kombu's publish
-- retry of the create riding with the fair-share hold — changes nothing, even once a worker has started the
-- job), or the queue's control (its JSON) when the queue is draining: nothing written.
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
if ARGV[4] ~= '' then
  local raw = redis.call('HGET', KEYS[3], ARGV[4])
  if raw then
    local ok, control = pcall(cjson.decode, raw)
    if ok and type(control) == 'table' and control['state'] == 'draining' then return raw end
  end
end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return false
