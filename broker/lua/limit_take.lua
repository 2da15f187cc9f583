-- An API key's request: counted against its rate, and a claim taken on each of its limits named, all checked and
-- taken in this one step (two requests racing for a key's last slot cannot both get it).
-- KEYS[1] the key's rate counter for this window  KEYS[2 ..] claim zsets (member -> expiry, epoch s)
-- ARGV[1] now (epoch s)  ARGV[2] the rate limit per window (0: unlimited; -1: this request is not counted here)
-- ARGV[3] the rate counter's TTL s  ARGV[4] the claim's member
-- then 4 per claim zset KEYS[1 + i]: cap (0: unlimited), the claim's TTL s, the zset's TTL s, kind ('conn' | 'job')
-- A 'conn' claim lives until its expiry (renewed while its connection is open). A 'job' claim names a job (or,
-- until the job exists, a submit in flight): it is given back when the job's record says it ended or is gone —
-- by the caller, when this refuses at the cap (`arbiter.gateway.limits.Limits.reclaim`: the job records are keys
-- this script is not given, and reading a thousand of them here would block Redis).
-- Returns {0} when counted and every claim taken; {1, seconds until the window ends} over the rate (no claim
-- taken); {1 + i, claims held} when zset i is at its cap (the request still counted; no claim taken).
local now = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
if rate >= 0 then
  local count = redis.call('INCR', KEYS[1])
  if count == 1 then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
  if rate > 0 and count > rate then
    local ttl = redis.call('TTL', KEYS[1])
    return {1, ttl > 0 and ttl or 1}
  end
end
local member = ARGV[4]
for i = 2, #KEYS do
  local a = 5 + (i - 2) * 4
  local cap, kind = tonumber(ARGV[a]), ARGV[a + 3]
  if cap > 0 then
    if kind == 'conn' then redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now) end
    local held = redis.call('ZCARD', KEYS[i])
    if held >= cap and redis.call('ZSCORE', KEYS[i], member) == false then return {i, held} end
  end
end
for i = 2, #KEYS do
  local a = 5 + (i - 2) * 4
  if tonumber(ARGV[a]) > 0 then
    redis.call('ZADD', KEYS[i], now + tonumber(ARGV[a + 1]), member)
    redis.call('EXPIRE', KEYS[i], ARGV[a + 2])
  end
end
return {0}
