-- One request's rate-limit windows and quota, decided and counted atomically.
-- The arithmetic is that of window.rs and quota.rs; keep them in step.
--
-- KEYS[1..n]: one hash per window (bucket index -> units, and h: the newest bucket written);
--   KEYS[n+1]: the quota hash
--   (u: units used, o: overage, s: 1 once seeded from the ledger, c: when the seed was claimed).
-- ARGV: now_ms, units, n, slots, quota limit (-1: none), hard (1/0), quota ttl ms,
--   then limit and window ms of each window.
-- Returns: verdict (0 admitted, 1 rate limited, 2 quota exceeded), units used, overage used,
--   overage reserved now, seed (1: this caller must add the ledger's count), then remaining and
--   reset ms of each window.

local now = tonumber(ARGV[1])
local units = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local slots = tonumber(ARGV[4])
local qlimit = tonumber(ARGV[5])
local hard = ARGV[6] == '1'
local qttl = tonumber(ARGV[7])

local windows = {}
local fits = true
for i = 1, n do
  local limit = tonumber(ARGV[6 + 2 * i])
  local length = tonumber(ARGV[7 + 2 * i])
  local width = math.max(1, math.floor(length / slots))
  local head = math.floor(now / width)
  -- The counted buckets, oldest first, and the newest bucket ever written ('h'): one HMGET,
  -- already in order.
  local fields = { 'h' }
  for b = head - slots, head do
    fields[#fields + 1] = b
  end
  local values = redis.call('HMGET', KEYS[i], unpack(fields))
  -- counts[k]: units of bucket head - slots + k - 1 (0 when none).
  local counts, total = {}, 0
  for j = 2, #values do
    local count = tonumber(values[j]) or 0
    counts[j - 1] = count
    total = total + count
  end
  windows[i] = { limit = limit, length = length, width = width, head = head, total = total,
    counts = counts, last = tonumber(values[1]) }
  if total + units > limit then
    fits = false
  end
end

local qkey = KEYS[n + 1]
local used, overage, seed = 0, 0, 0
local quota = redis.call('HMGET', qkey, 'u', 'o', 's', 'c')
if not quota[1] then
  -- Created here, and given its lifetime (the period's end and a grace) once: the period of a
  -- key never changes.
  redis.call('HSET', qkey, 'u', 0, 'o', 0, 's', 0, 'c', now)
  redis.call('PEXPIRE', qkey, qttl)
  seed = 1
else
  used, overage = tonumber(quota[1]), tonumber(quota[2])
  -- A claim not honoured within 10 s (its gateway died) passes to this caller.
  if quota[3] == '0' and now - tonumber(quota[4]) > 10000 then
    redis.call('HSET', qkey, 'c', now)
    seed = 1
  end
end

local verdict = 0
if qlimit >= 0 and hard and used + units > qlimit then
  verdict = 2
elseif not fits then
  verdict = 1
end

local reserved_overage = 0
if verdict == 0 then
  for i = 1, n do
    local w = windows[i]
    -- Buckets written before that no longer count: those from the last write's oldest counted
    -- one to the one before this write's oldest (all older ones were deleted then).
    if w.last and w.last < w.head then
      local stale = {}
      for b = w.last - slots, math.min(w.last, w.head - slots - 1) do
        stale[#stale + 1] = b
      end
      if #stale > 0 then
        redis.call('HDEL', KEYS[i], unpack(stale))
      end
    end
    redis.call('HINCRBY', KEYS[i], w.head, units)
    -- The first write of a bucket moves 'h' and the key's lifetime: it must outlive the newest
    -- bucket, which counts until (head + 1) * width + length, no later than now + length + width.
    -- Later writes of the same bucket change neither.
    if w.last ~= w.head then
      redis.call('HSET', KEYS[i], 'h', w.head)
      redis.call('PEXPIRE', KEYS[i], w.length + w.width)
    end
    w.total = w.total + units
    w.counts[slots + 1] = w.counts[slots + 1] + units
  end
  if qlimit >= 0 and not hard then
    reserved_overage = math.max(0, used + units - math.max(qlimit, used))
  end
  used = used + units
  overage = overage + reserved_overage
  redis.call('HINCRBY', qkey, 'u', units)
  if reserved_overage > 0 then
    redis.call('HINCRBY', qkey, 'o', reserved_overage)
  end
end

local out = { verdict, used, overage, reserved_overage, seed }
for i = 1, n do
  local w = windows[i]
  local target
  if w.total + units > w.limit then
    target = w.limit - units
  else
    target = w.total - 1
  end
  target = math.max(0, target)
  local reset = 0
  if w.total > target then
    local counted = w.total
    reset = w.length
    for k = 1, slots + 1 do
      local count = w.counts[k]
      if count > 0 then
        counted = counted - count
        if counted <= target then
          reset = (w.head - slots + k) * w.width + w.length - now
          break
        end
      end
    end
  end
  out[#out + 1] = math.max(0, w.limit - w.total)
  out[#out + 1] = reset
end
return out
