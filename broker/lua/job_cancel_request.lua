-- Ask a job's worker to stop it at its next step: only for a job that has a record (a cancel of an unknown
-- or expired id must not create one). A job whose improvement run is queued or running has that run ended
-- with it: the job's improvement is marked `cancelled` here (and `improve_adopt.lua` adopts nothing for a job
-- with a cancel requested), and the run's id is returned for the caller to cancel it too.
-- KEYS[1] job hash
-- Returns 0 if there is no such job; the improvement run's id when it was queued or running; else 1.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'cancel_requested', 1)
local run = redis.call('HGET', KEYS[1], 'improvement')
if run and redis.call('HGET', KEYS[1], 'improvement_state') == 'queued' then
  redis.call('HSET', KEYS[1], 'improvement_state', 'cancelled')
  return run
end
return 1
