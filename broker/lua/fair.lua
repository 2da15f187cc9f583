-- Fair share within a band (broker/fairshare.py), in one step each:
--   'hold' (the producer's transport, in place of kombu's LPUSH onto the band's queue): first the job's ETA at
--     submit (below); when no tenant waits in the band, the queue is under its target and the tenant has no
--     cap, the message goes straight onto the queue (what the feed would do at once); else the message —
--     Celery's own bytes for the band — onto its tenant's held list; the tenant into the band's ring if it
--     was not in it (with its weight and cap into the band's policy hash); the held count up; the record's
--     `held` mark (no sweep sends it another message) and `eta_s`; then feed.
--   'feed' (a worker that took a batch job, the beat each tick): move held messages onto the band's queue
--     until it holds `target` messages. Weighted round robin: the tenant at the ring's head gives its oldest
--     (the right end of its list) and keeps the head until it has given its weight's worth this round (the
--     credit left is kept in the policy hash, so feeds of one message at a time still give w in a row), then
--     goes to the back while it has more. A tenant with a cap that has that many jobs fed and not ended
--     (its active set, pruned of ended jobs as it is read) is passed over: its jobs stay held. Bytes move
--     unchanged. A message whose job is no longer queued (cancelled while held) is dropped; one whose record
--     is gone moves on.
-- The target is the beat's (KEYS[5]: about ARBITER_FAIR_SHARE_DEPTH messages per worker slot of the workload,
-- 0 while the queue is paused), or ARGV[5] when no beat has set one.
-- ETA at submit (broker.position's formula, as `arbiter status` would give it at that moment): ahead = the
-- stronger bands' queues and held jobs + the band's queue + the held jobs the weighted round robin feeds
-- first; eta = (ahead + 1) x the median of the band's recent run times / the workload's live worker slots.
-- None (no `eta_s`) while the queue is paused, with no live worker or fewer than 3 recent runs. Its second
-- factor, median / slots, is kept for a second (KEYS[11]) once known: a burst of submits reads the workers'
-- registrations and sorts the run times once a second, not once a job.
-- KEYS[1] ring  KEYS[2] ring members  KEYS[3] held count  KEYS[4] the band's Celery queue  KEYS[5] target
-- KEYS[6] the band's policy hash (w:<tenant> weight, c:<tenant> cap, d:<tenant> credit left this round,
--   p:<tenant> messages ever pushed onto the tenant's held list: a held job's `hseq` is that count at its hold,
--   so its place in the list is read in O(1): position.lua)
-- 'hold' only: KEYS[7] the tenant's held list  KEYS[8] the job hash  KEYS[9] the workers' registrations
--   KEYS[10] the band's recent run times  KEYS[11] the band's seconds per job (median / slots), kept 1 s
--   KEYS[12..] the stronger bands' queues, then their held counts
-- ARGV[1] 'hold' | 'feed'  ARGV[2] prefix of the tenants' held lists  ARGV[3] prefix of job keys  ARGV[4] now
-- ARGV[5] default target  ARGV[6] prefix of the workload's active sets (a tenant's fed, unended job ids)
-- 'hold' only: ARGV[7] message  ARGV[8] tenant  ARGV[9] '<queue>|<tenant>'  ARGV[10] weight  ARGV[11] cap
--   ARGV[12] workload ('' : no ETA at submit, ARBITER_ETA_AT_SUBMIT=false)  ARGV[13] '1': hold only if the job's
--   record exists (its creation ran just before, in the same round trip, and may have been refused: a drained queue)
--   and is not held or fed already (the same hold sent again after its reply was lost: kombu's publish retry)
-- Returns the number of messages moved onto the band's queue (-1: not held, no record).
local function weight(t)
  return math.max(1, tonumber(redis.call('HGET', KEYS[6], 'w:' .. t) or '1') or 1)
end

local function seconds_per_job()
  local kept = tonumber(redis.call('GET', KEYS[11]) or '')
  if kept then return kept end
  local slots = 0
  local workers = redis.call('HGETALL', KEYS[9])
  for i = 2, #workers, 2 do
    local ok, e = pcall(cjson.decode, workers[i])
    if ok and type(e) == 'table' and e['workload'] == ARGV[12]
        and tonumber(e['expires_at'] or 0) >= tonumber(ARGV[4]) then
      slots = slots + (tonumber(e['concurrency']) or 0)
    end
  end
  local runs = redis.call('LRANGE', KEYS[10], 0, -1)
  if slots <= 0 or #runs < 3 then return nil end
  for i = 1, #runs do runs[i] = tonumber(runs[i]) or 0 end
  table.sort(runs)
  local rate = runs[math.floor(#runs / 2) + 1] / slots
  redis.call('SET', KEYS[11], string.format('%.17g', rate), 'PX', 1000)
  return rate
end

local function eta_at_submit(target, queued)
  if target <= 0 or ARGV[12] == '' then return nil end
  local per_job = seconds_per_job()
  if not per_job then return nil end
  -- the held jobs fed before this one (broker.fairshare.rank): it is `index`-th (0 = oldest) of its tenant's
  local tenant, index = ARGV[8], redis.call('LLEN', KEYS[7])
  local mine = math.max(1, tonumber(ARGV[10]) or 1)
  local round = math.floor(index / mine)
  local ahead, before = index, true
  for _, t in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
    if t == tenant then
      before = false
    else
      local n = round + (before and 1 or 0)
      ahead = ahead + math.min(redis.call('LLEN', ARGV[2] .. t), weight(t) * n)
    end
  end
  ahead = ahead + queued
  local stronger = (#KEYS - 11) / 2
  for i = 1, stronger do
    ahead = ahead + redis.call('LLEN', KEYS[11 + i])
      + math.max(0, tonumber(redis.call('GET', KEYS[11 + stronger + i]) or '0') or 0)
  end
  return (ahead + 1) * per_job
end

-- The job id of a Celery message (and its job key): its headers' task id. Found in the envelope's text
-- (kombu writes the headers, task id first, before `argsrepr`, where a prompt's quotes are escaped), else by
-- decoding it.
local function job_of(msg)
  local id = string.match(msg, '"id": "([%w%-]+)"')
  if not id then
    local ok, envelope = pcall(cjson.decode, msg)
    id = ok and type(envelope) == 'table' and type(envelope['headers']) == 'table' and envelope['headers']['id']
  end
  if type(id) ~= 'string' then return nil, nil end
  return id, ARGV[3] .. id
end

-- Whether the tenant is at its cap now, and whether it has one.
local function capped(tenant)
  local cap = tonumber(redis.call('HGET', KEYS[6], 'c:' .. tenant) or '0') or 0
  if cap <= 0 then return false, false end
  local active = ARGV[6] .. tenant
  for _, id in ipairs(redis.call('SMEMBERS', active)) do
    local state = redis.call('HGET', ARGV[3] .. id, 'state')
    if not state or state == 'finished' or state == 'failed' or state == 'cancelled' then
      redis.call('SREM', active, id)
    end
  end
  return redis.call('SCARD', active) >= cap, true
end

if ARGV[1] == 'hold' and ARGV[13] == '1' then
  if redis.call('EXISTS', KEYS[8]) == 0 then return -1 end
  if redis.call('HEXISTS', KEYS[8], 'held') == 1 or redis.call('HEXISTS', KEYS[8], 'fed_at') == 1 then return 0 end
end
local target = tonumber(redis.call('GET', KEYS[5]) or ARGV[5])
local queued = redis.call('LLEN', KEYS[4])   -- the band's queue now (a hold does not change it before the feed)
if ARGV[1] == 'hold' then
  local tenant = ARGV[8]
  local eta = eta_at_submit(target, queued)
  local eta_field = eta and string.format('%.3f', eta)
  -- Nobody waits in the band, the queue has room and the tenant has no cap: the feed below would take this
  -- message straight back out, so it goes onto the queue at once, marked fed (10 commands less).
  if (tonumber(ARGV[11]) or 0) <= 0 and queued < target and redis.call('LLEN', KEYS[1]) == 0 then
    redis.call('LPUSH', KEYS[4], ARGV[7])
    if eta then
      redis.call('HSET', KEYS[8], 'fed_at', ARGV[4], 'eta_s', eta_field)
    else
      redis.call('HSET', KEYS[8], 'fed_at', ARGV[4])
    end
    return 1
  end
  redis.call('LPUSH', KEYS[7], ARGV[7])
  redis.call('INCR', KEYS[3])
  local hseq = redis.call('HINCRBY', KEYS[6], 'p:' .. tenant, 1)   -- the held list's pushes: its place (position.lua)
  if eta then
    redis.call('HSET', KEYS[8], 'held', ARGV[9], 'hseq', hseq, 'eta_s', eta_field)
  else
    redis.call('HSET', KEYS[8], 'held', ARGV[9], 'hseq', hseq)
  end
  if redis.call('SADD', KEYS[2], tenant) == 1 then   -- joins the ring: its weight and cap as this submit has them
    redis.call('RPUSH', KEYS[1], tenant)
    redis.call('HSET', KEYS[6], 'w:' .. tenant, ARGV[10])
    if (tonumber(ARGV[11]) or 0) > 0 then
      redis.call('HSET', KEYS[6], 'c:' .. tenant, ARGV[11])
    else
      redis.call('HDEL', KEYS[6], 'c:' .. tenant)
    end
  end
end
local want = target - queued
local moved, turns, passed = 0, 0, 0
while moved < want and turns < 100000 do
  turns = turns + 1
  local tenant = redis.call('LPOP', KEYS[1])
  if not tenant then break end
  local list = ARGV[2] .. tenant
  local at_cap, has_cap = capped(tenant)
  if at_cap then
    redis.call('RPUSH', KEYS[1], tenant)   -- keeps its jobs and its place in the rounds to come
    passed = passed + 1
    if passed >= redis.call('LLEN', KEYS[1]) then break end   -- every tenant with held jobs is at its cap
  else
    passed = 0
    local msg = redis.call('RPOP', list)
    if msg then
      if redis.call('DECR', KEYS[3]) < 0 then redis.call('SET', KEYS[3], 0) end
      local id, key = job_of(msg)
      local state = key and redis.call('HGET', key, 'state')
      if not state or state == 'queued' then
        if state then
          redis.call('HDEL', key, 'held')
          redis.call('HSET', key, 'fed_at', ARGV[4])
          if has_cap then
            redis.call('SADD', ARGV[6] .. tenant, id)
            redis.call('EXPIRE', ARGV[6] .. tenant, 86400)
          end
        end
        redis.call('LPUSH', KEYS[4], msg)
        moved = moved + 1
      end
    end
    if redis.call('LLEN', list) > 0 then
      local credit = tonumber(redis.call('HGET', KEYS[6], 'd:' .. tenant) or weight(tenant)) - 1
      if credit > 0 then   -- its round goes on: it stays at the head
        redis.call('HSET', KEYS[6], 'd:' .. tenant, credit)
        redis.call('LPUSH', KEYS[1], tenant)
      else
        redis.call('HDEL', KEYS[6], 'd:' .. tenant)
        redis.call('RPUSH', KEYS[1], tenant)
      end
    else
      redis.call('HDEL', KEYS[6], 'd:' .. tenant)
      redis.call('SREM', KEYS[2], tenant)
    end
  end
end
return moved
