-- Ask a job's worker to stop it at its next step: only for a job that has a record (a cancel of an unknown
-- or expired id must not create one).
-- KEYS[1] job hash
-- Returns 1 if flagged, 0 if there is no such job.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'cancel_requested', 1)
return 1
