-- Move every message of a worker's own queue (jobs passed to it by affinity) back to the front of its
-- shared queue, atomically, rewriting each message's routing key to the shared queue: a later requeue or
-- restore of the message (kombu restores to the routing key it was delivered with) then goes to the shared
-- queue, never back to the private queue of a worker that is gone.
-- KEYS[1] the private queue   KEYS[2] the shared queue
-- ARGV[1] the private queue's name (its routing key)   ARGV[2] the shared queue's name
-- Returns the number of messages moved.
local moved = 0
local from_spaced, from_tight = '"routing_key": "' .. ARGV[1] .. '"', '"routing_key":"' .. ARGV[1] .. '"'
local to = '"routing_key": "' .. ARGV[2] .. '"'
while true do
  local msg = redis.call('LPOP', KEYS[1])   -- newest first: the oldest ends up in front
  if not msg then break end
  for _, from in ipairs({from_spaced, from_tight}) do
    local i, j = string.find(msg, from, 1, true)
    if i then msg = string.sub(msg, 1, i - 1) .. to .. string.sub(msg, j + 1) break end
  end
  redis.call('RPUSH', KEYS[2], msg)   -- the front: BRPOP takes from the right
  moved = moved + 1
end
return moved
