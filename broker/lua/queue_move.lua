-- Move a queued job to another band: its old message leaves its list, the new one (built by Celery's send
-- path, carrying the new spec) joins the back of the new queue, and the job record's spec and priority change,
-- all in one step: a worker sees either the old message and the old record, or the new ones, never both.
-- KEYS[1] the list the old message waits in   KEYS[2] the new queue   KEYS[3] the staging list   KEYS[4] the job record
-- ARGV[1] the old message's exact bytes   ARGV[2] the new message   ARGV[3] the new spec (JSON)
-- ARGV[4] the new priority   ARGV[5] now
-- Returns 1 moved; 0 the old message is gone (a worker took it): nothing changed; -1 the job is not queued.
redis.call('DEL', KEYS[3])
if redis.call('HGET', KEYS[4], 'state') ~= 'queued' then return -1 end
if redis.call('LREM', KEYS[1], 1, ARGV[1]) ~= 1 then return 0 end
redis.call('LPUSH', KEYS[2], ARGV[2])
redis.call('HSET', KEYS[4], 'spec', ARGV[3], 'priority', ARGV[4], 'updated_at', ARGV[5])
return 1
