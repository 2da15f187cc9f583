-- Shared by the job and lease scripts, not a script of its own: `broker.lua.load` puts it in place of a
-- script's `-- #include job_lib` line, so the state check, the field loop, the event, the lease fit and the
-- side writes are written once (job_transition, job_settle, job_start, lease_acquire).
-- Lease value: "mib|expires_at|kind|priority|workload|worker|fence" (a job's: "...|worker|variant|fence").

-- Whether `state` is one of `list` (comma separated).
local function state_in(state, list)
  for s in string.gmatch(list, '[^,]+') do
    if s == state then return true end
  end
  return false
end

-- The record's fields from ARGV[first .. last] as name, value pairs: '+name' is incremented by the value,
-- '?name' is set only if it has no value yet, any other is set — all plain sets (and `sets`, a flat list of
-- name, value) in one HSET.
local function write_fields(record, first, last, sets)
  sets = sets or {}
  for i = first, last, 2 do
    local op, name = string.sub(ARGV[i], 1, 1), string.sub(ARGV[i], 2)
    if op == '+' then
      redis.call('HINCRBY', record, name, ARGV[i + 1])
    elseif op == '?' then
      redis.call('HSETNX', record, name, ARGV[i + 1])
    else
      sets[#sets + 1] = ARGV[i]
      sets[#sets + 1] = ARGV[i + 1]
    end
  end
  if #sets > 0 then redis.call('HSET', record, unpack(sets)) end
end

-- One state event on the job's stream; a stream made by it lives as long as the record.
local function state_event(events, record, maxlen, state, from)
  redis.call('XADD', events, 'MAXLEN', '~', maxlen, '*', 'type', 'state', 'state', state, 'from', from)
  if redis.call('TTL', events) < 0 then
    redis.call('EXPIRE', events, math.max(redis.call('TTL', record), 1))
  end
end

-- A terminal job: out of the live set, record and stream kept `ttl` s, its checkpoint dropped (nothing
-- resumes it) and its fence counter given the record's TTL.
local function terminal(record, events, live, checkpoint, fence_key, job_id, ttl)
  redis.call('ZREM', live, job_id)
  redis.call('EXPIRE', record, ttl)
  redis.call('EXPIRE', events, ttl)
  redis.call('DEL', checkpoint)
  redis.call('EXPIRE', fence_key, ttl)
end

-- Whether a lease of `mib` (plus the weights `wfield` of `wmib` unless held already) fits under `capacity`
-- on the GPU's leases hash; expired leases are dropped first, so a killed worker's memory comes back by
-- itself. Returns 1 (fits), 0 (no room) or -1 (the job's live lease names another holder: one job id never
-- runs twice at once), and the MiB free after (1) or now (0).
local function lease_fit(leases, now, capacity, job_id, mib, holder, wfield, wmib)
  local used, weights_held = 0, false
  local flat = redis.call('HGETALL', leases)
  for i = 1, #flat, 2 do
    local field, value = flat[i], flat[i + 1]
    local lmib, exp, _, _, _, worker = string.match(value, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|')
    if tonumber(exp) < now then
      redis.call('HDEL', leases, field)
    elseif field == job_id then
      if worker ~= holder then return -1, 0 end
    else
      if field == wfield then weights_held = true end
      used = used + tonumber(lmib)
    end
  end
  local need = mib
  if wfield ~= '' and not weights_held then need = need + wmib end
  if used + need > capacity then return 0, capacity - used end
  return 1, capacity - used - need
end

-- Write the job's lease (and the weights lease, renewed if held) with a new fence; returns the fence. A job's
-- lease names the variant it runs (after its holder: "...|holder|variant|fence"), so weights in use are known.
local function lease_write(leases, fence_key, now, ttl, job_id, mib, priority, workload, holder, wfield, wmib)
  local fence = redis.call('INCR', fence_key)
  redis.call('EXPIRE', fence_key, 86400 * 7)
  local expires = now + ttl
  local rest = '|' .. workload .. '|' .. holder .. '|'
  if wfield ~= '' then
    redis.call('HSET', leases, job_id, mib .. '|' .. expires .. '|job|' .. priority .. rest
               .. string.match(wfield, '|(.*)$') .. '|' .. fence,
               wfield, wmib .. '|' .. expires .. '|weights|-' .. rest .. '0')
  else
    redis.call('HSET', leases, job_id, mib .. '|' .. expires .. '|job|' .. priority .. rest .. fence)
  end
  return fence
end

-- The lease asked for in ARGV[1 .. 10] (lease_acquire.lua and job_start.lua share that layout: now,
-- capacity MiB, job id, job MiB, ttl s, priority, workload, holder, weights field, weights MiB) on the GPU's
-- `leases` hash: granted with a new fence from `fence_key`, or not. Returns code (1 granted, 0 no room, -1
-- held by another holder), the fence (0 when not granted) and the MiB free after (1) or now (0).
local function lease_take(leases, fence_key)
  local now = tonumber(ARGV[1])
  local fits, free = lease_fit(leases, now, tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4]), ARGV[8], ARGV[9],
                               tonumber(ARGV[10]))
  if fits ~= 1 then return fits, 0, free end
  return 1, lease_write(leases, fence_key, now, tonumber(ARGV[5]), ARGV[3], ARGV[4], ARGV[6], ARGV[7], ARGV[8],
                        ARGV[9], ARGV[10]), free
end

-- Side writes that ride in the step (`broker.scriptops.ScriptOps`: counters, histograms, a predictor),
-- from ARGV[first ..]: each is a command, the index of its key after KEYS[base] (0: KEYS[base + 1]), its
-- argument count, the arguments. Only the commands ScriptOps makes; one that fails (a key of the wrong type)
-- is skipped, never undoing the step (counters are best effort). Returns their replies, in order (false:
-- failed).
local SIDE_WRITES = {HINCRBY = true, HINCRBYFLOAT = true, LPUSH = true, LTRIM = true, SET = true, HLEN = true,
                     PUBLISH = true, EXPIRE = true}
local function side_writes(first, base)
  local i = first
  while i <= #ARGV do   -- every command checked before the first is run
    if not SIDE_WRITES[ARGV[i]] then error('side write not allowed: ' .. ARGV[i]) end
    i = i + 3 + tonumber(ARGV[i + 2])
  end
  local replies = {}
  i = first
  while i <= #ARGV do
    local n = tonumber(ARGV[i + 2])
    local reply = redis.pcall(ARGV[i], KEYS[base + 1 + tonumber(ARGV[i + 1])], unpack(ARGV, i + 3, i + 2 + n))
    if type(reply) == 'table' and reply.err then reply = false end   -- best effort: the step stands
    replies[#replies + 1] = reply
    i = i + 3 + n
  end
  return replies
end
