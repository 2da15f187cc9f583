-- Move a queued job's message to the front of its list: the right end, the next message a worker takes
-- (kombu LPUSHes at the left and BRPOPs at the right). One step: the message is never off the list.
-- KEYS[1] the list
-- ARGV[1] the message's exact bytes (as found by broker/position.py)
-- Returns 1 if moved, 0 if the message is no longer there (a worker took it meanwhile).
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('RPUSH', KEYS[1], ARGV[1])
  return 1
end
return 0
