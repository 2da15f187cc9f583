-- A job's place in a list (1 = the right end, next to be taken), from counters, and only the place goes out.
-- The list's push count (KEYS[2] field ARGV[2]) and the job's own count at its push (its record's field ARGV[3])
-- give an estimate, qseq - pushed + LLEN, exact while every push at the left was counted and messages leave
-- from the right (queue_push.lua; fair.lua's hold for the held lists). It is checked with one LINDEX; a push
-- not counted or a message taken from the middle moves it a little, so the ARGV[4] places either side are
-- searched next; a job with no count (fed by the fair-share feed, or in a worker's own list) is searched from
-- the right end over ARGV[4] places; then, rarely, the list up to ARGV[5] messages, in chunks, here in Redis.
-- KEYS[1] the list  KEYS[2] the push counts (hash)  KEYS[3] the job hash
-- ARGV[1] job id  ARGV[2] the list's field in KEYS[2]  ARGV[3] the record's count field ('qseq' | 'hseq')
-- ARGV[4] radius  ARGV[5] cap
-- Returns {place or -1, how it was found: 0 exact, 1 nearby, 2 scanned, 3 not found within the cap}.
local len = redis.call('LLEN', KEYS[1])
if len == 0 then return {-1, 3} end
local id = ARGV[1]
local radius, cap = tonumber(ARGV[4]), tonumber(ARGV[5])
local seq = tonumber(redis.call('HGET', KEYS[3], ARGV[3]) or '')
local est = 1
if seq then
  est = seq - tonumber(redis.call('HGET', KEYS[2], ARGV[2]) or '0') + len
  if est >= 1 and est <= len then
    local m = redis.call('LINDEX', KEYS[1], -est)
    if m and string.find(m, id, 1, true) then return {est, 0} end
  end
end
-- places lo..hi, nearest the right end first
local function search(lo, hi)
  lo, hi = math.max(1, lo), math.min(len, hi)
  if lo > hi then return nil end
  local items = redis.call('LRANGE', KEYS[1], -hi, -lo)   -- left to right: place hi .. lo
  for i = #items, 1, -1 do
    if string.find(items[i], id, 1, true) then return lo + (#items - i) end
  end
  return nil
end
local near = search(est - radius, seq and est + radius or math.min(est + radius, cap))
if near then return {near, 1} end
local chunk = 1000
local from = 1
while from <= math.min(len, cap) do
  local found = search(from, math.min(from + chunk - 1, cap))
  if found then return {found, 2} end
  from = from + chunk
end
return {-1, 3}
