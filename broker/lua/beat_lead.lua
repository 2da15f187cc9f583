-- Take or keep the beat's leadership. The lock's value is '<epoch>:<token>': `epoch` grows by one at every
-- change of leader (a counter that never expires), `token` names the beat process. Every write the leader makes
-- is fenced by this value (`broker.fence`): once another beat holds the lock, or it expired, Redis refuses them.
-- The leader's policy is published with the lock's TTL.
-- KEYS[1] leader lock  KEYS[2] epoch counter  KEYS[3] leader's policy
-- ARGV[1] the beat's token  ARGV[2] lock TTL in ms  ARGV[3] the beat's policy
-- Returns the lock's value if this beat leads (kept or taken), false if another beat does.
local cur = redis.call('GET', KEYS[1])
local value
if cur then
  if string.sub(cur, -string.len(ARGV[1]) - 1) ~= ':' .. ARGV[1] then return false end
  value = cur
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
else
  value = redis.call('INCR', KEYS[2]) .. ':' .. ARGV[1]
  redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
end
redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[2])
return value
