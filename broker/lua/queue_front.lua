-- Put a message built by Celery's send path (in a staging list) at the front of a queue: the right end, the
-- next message a worker takes. Used to put back, in its place, a job taken from a queue that was paused.
-- KEYS[1] the queue   KEYS[2] the staging list
-- ARGV[1] the message (the staged one, its routing key set to the queue)
-- Returns the queue's new length.
redis.call('DEL', KEYS[2])
return redis.call('RPUSH', KEYS[1], ARGV[1])
