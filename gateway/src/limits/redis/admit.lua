-- One request's rate-limit windows and quota, decided and counted atomically.
-- The arithmetic is that of window.rs and quota.rs; keep them in step.
--
-- KEYS[1..n]: one hash per window: bucket number -> units, and
--   h: the newest bucket written, t: the units of the buckets counted then (h - slots to h),
--   f: the oldest of those buckets holding units (absent while t is 0);
--   KEYS[n+1]: the quota hash
--   (u: units used, o: overage, p and q: of them, those from before the hash was made (what
--   it was seeded and raised to, and calls decided before a), which a ledger read of the events
--   before a may hold; s: 1 once seeded from the ledger, c: when the seed was claimed, a: when
--   the hash was made, n: its generation, the token of the call that created it, v: its
--   version, raised by every call that changes u (an admission, a rebuild's raise, a batch the
--   share script adds, a seed, a refund), so that a gateway tells an older answer from a
--   newer; a hash made
--   before p, q and a existed has none of them; f: 1 once a seed failed (the ledger could not
--   be read), until one succeeds);
--   KEYS[n+2]: the period the customer was last counted in ("start end", ms). A customer whose
--   billing period changed, and changed back, returns to a hash that lacks what was counted in
--   the other period meanwhile: a call whose period overlaps that one without being it counts
--   in a new hash, rebuilt from the ledger as one Redis lost would be, from what the stale
--   one counted (its part from before). (One period after another, as at a month's end, do
--   not overlap: a gateway whose clock is behind still counts in the period that is ending.)
-- ARGV: now_ms, units, n, slots, quota limit (-1: none), hard (1/0), quota ttl ms,
--   then limit and window ms of each window, then this call's token (1 to 2^53 - 1), then the
--   caller's own count of the period (units, overage; what Redis last told it and what it
--   counted since) and the generation of the hash it last counted in (-2: none known), then
--   how long a claim to seed holds (ms), how long after a claim whose seed failed the next
--   one is made (ms), whether this call waits for another caller's seed (1/0), the
--   period's start and end (ms), and the units the caller counted in process that this hash may
--   not hold yet (a hard quota refuses as if they were in it).
-- Returns one string of integers separated by spaces (one bulk reply is far cheaper to build
-- and to parse than an array): verdict (0 admitted, 1 rate limited, 2 quota exceeded, 3 the
-- quota is being seeded by another caller: only that, nothing counted, ask again), units
-- used, overage used, overage reserved now, seed (0, or when the hash was made: this caller
-- must add the ledger's count of the events before then), then remaining and reset ms of each
-- window, then whether the quota hash was seeded before this call (1/0) and its generation (-1
-- for a hash made before generations), and the hash's version after this call (v).
--
-- Most calls read three fields per window: the buckets themselves are read only when time has
-- moved past the newest bucket written (what no longer counts is taken off t; once per bucket)
-- and when a window is over its limit (the reset walks them).

local now = tonumber(ARGV[1])
local units = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local slots = tonumber(ARGV[4])
local qlimit = tonumber(ARGV[5])
local hard = ARGV[6] == '1'
local qttl = tonumber(ARGV[7])

-- Units of each bucket from `from` to `to`, as numbers (0 for none).
local function buckets(key, from, to)
  if from > to then
    return {}
  end
  local fields = {}
  for b = from, to do
    fields[#fields + 1] = b
  end
  local values = redis.call('HMGET', key, unpack(fields))
  local counts = {}
  for k = 1, #fields do
    counts[k] = tonumber(values[k]) or 0
  end
  return counts
end

local windows = {}
local fits = true
for i = 1, n do
  local key = KEYS[i]
  local limit = tonumber(ARGV[6 + 2 * i])
  local length = tonumber(ARGV[7 + 2 * i])
  local width = math.max(1, math.floor(length / slots))
  local head = math.floor(now / width)
  local state = redis.call('HMGET', key, 'h', 't', 'f')
  local last, total, first = tonumber(state[1]), tonumber(state[2]) or 0, tonumber(state[3])
  if last and last > head then
    -- A call behind the newest bucket written (another gateway's clock is ahead, or the call
    -- arrived late) decides and counts at that bucket, as window.rs does: the head never moves
    -- back, so t always holds the buckets from h - slots to h.
    head = last
  end
  local oldest = head - slots
  local stale = nil
  if last == nil then
    total, first = 0, nil
  elseif last < head then
    -- Buckets written before that no longer count: from the last write's oldest counted one to
    -- the one before this call's oldest (all older ones were deleted then).
    local from, to = last - slots, math.min(last, oldest - 1)
    if from <= to then
      stale = {}
      for b = from, to do
        stale[#stale + 1] = b
      end
      for _, count in ipairs(buckets(key, from, to)) do
        total = total - count
      end
    end
    if first and first < oldest then
      first = nil
      if total > 0 then
        for k, count in ipairs(buckets(key, oldest, last)) do
          if count > 0 then
            first = oldest + k - 1
            break
          end
        end
      end
    end
  end
  windows[i] = { key = key, limit = limit, length = length, width = width, head = head,
    total = total, first = first, last = last, stale = stale }
  if total + units > limit then
    fits = false
  end
end

local qkey = KEYS[n + 1]
local period = ARGV[15 + 2 * n] .. ' ' .. ARGV[16 + 2 * n]
local last = redis.call('GET', KEYS[n + 2])
-- What the stale hash counted: units of this period all the same, decided before the hash made
-- again, so its floor from before (raised by the ledger's count, never added to it).
local floor = nil
if last ~= period then
  if last then
    local start, finish = string.match(last, '^(%-?%d+) (%-?%d+)$')
    start, finish = tonumber(start), tonumber(finish)
    if start and start ~= tonumber(ARGV[15 + 2 * n]) and start < tonumber(ARGV[16 + 2 * n])
      and tonumber(ARGV[15 + 2 * n]) < finish then
      floor = redis.call('HMGET', qkey, 'u', 'o')
      redis.call('DEL', qkey)
    end
  end
  -- As long as the longest of the periods it was set for: a hash it made stale lives that long.
  local ttl = redis.call('PTTL', KEYS[n + 2])
  if ttl < qttl then
    ttl = qttl
  end
  redis.call('SET', KEYS[n + 2], period, 'PX', ttl)
end
local used, overage, seed = 0, 0, 0
local quota = redis.call('HMGET', qkey, 'u', 'o', 's', 'n', 'a', 'c', 'f', 'v')
local generation = tonumber(quota[4]) or -1
local made = tonumber(quota[5])
local created = not quota[1]
local version = tonumber(quota[8]) or 0
if created then
  -- Created here, with its lifetime: the period's end and a grace.
  generation = tonumber(ARGV[8 + 2 * n])
  made = now
  redis.call('HSET', qkey, 'u', 0, 'o', 0, 'p', 0, 'q', 0, 's', 0, 'c', now, 'a', now,
    'n', generation)
  redis.call('PEXPIRE', qkey, qttl)
  seed = now
  if floor and floor[1] then
    used, overage = tonumber(floor[1]) or 0, tonumber(floor[2]) or 0
    redis.call('HSET', qkey, 'u', used, 'o', overage, 'p', used, 'q', overage)
  end
else
  used, overage = tonumber(quota[1]), tonumber(quota[2])
  if quota[3] == '0' then
    local failed = quota[7] == '1'
    local hold = tonumber(ARGV[12 + 2 * n])
    if failed then
      hold = tonumber(ARGV[13 + 2 * n])
    end
    if now - (tonumber(quota[6]) or 0) > hold then
      -- A claim not honoured in time (its caller died, or its reply was lost) passes to this
      -- caller, as does, now and then, one whose seed failed.
      redis.call('HSET', qkey, 'c', now)
      seed = made or now
    elseif qlimit >= 0 and not failed and ARGV[14 + 2 * n] == '1' then
      -- Another caller is reading the ledger for this count: deciding on it now would admit
      -- on a count the ledger may be far above. Nothing is counted; the caller asks again.
      -- Once a reading failed, calls count on what the hash holds instead of waiting on
      -- readings that may fail again.
      return '3'
    end
  end
end
-- A caller that made this hash, or that last counted in another hash of this period (Redis
-- lost it since), knows a count this one may lack (a hash made before `a` existed is not
-- raised: its units have no part from before): units counted before it was made
-- whose events the ledger does not hold yet (they wait in the gateways' spools), and units
-- counted in process since. Each such count is a floor of the customer's true count: the hash
-- takes the highest one it is told.
local known_generation = tonumber(ARGV[11 + 2 * n])
if made and (created or (known_generation ~= -2 and known_generation ~= generation)) then
  local known_used, known_overage = tonumber(ARGV[9 + 2 * n]), tonumber(ARGV[10 + 2 * n])
  if known_used > used then
    redis.call('HINCRBY', qkey, 'p', known_used - used)
    used = known_used
    redis.call('HSET', qkey, 'u', used)
    version = redis.call('HINCRBY', qkey, 'v', 1)
  end
  if known_overage > overage then
    redis.call('HINCRBY', qkey, 'q', known_overage - overage)
    overage = known_overage
    redis.call('HSET', qkey, 'o', overage)
  end
end

local verdict = 0
local pending = tonumber(ARGV[17 + 2 * n]) or 0
if qlimit >= 0 and hard and used + pending + units > qlimit then
  verdict = 2
elseif not fits then
  verdict = 1
end

-- Each window moves to this call's bucket, admitted or not, as window.rs advances its head
-- whenever it counts: buckets that no longer count leave t and the hash.
for i = 1, n do
  local w = windows[i]
  if w.last and w.last < w.head then
    if w.stale then
      redis.call('HDEL', w.key, unpack(w.stale))
    end
    if w.first then
      redis.call('HSET', w.key, 'h', w.head, 't', w.total, 'f', w.first)
    else
      redis.call('HSET', w.key, 'h', w.head, 't', w.total)
      redis.call('HDEL', w.key, 'f')
    end
    w.last = w.head
  end
end

local reserved_overage = 0
if verdict == 0 then
  -- Whether a bucket got its first write: the quota key's lifetime is set again then (a
  -- customer's billing period may end later than when the key was made), not on every call.
  local moved = n == 0
  for i = 1, n do
    local w = windows[i]
    local count = redis.call('HINCRBY', w.key, w.head, units)
    w.total = w.total + units
    if w.last == nil then
      w.first = w.head
      redis.call('HSET', w.key, 'h', w.head, 't', w.total, 'f', w.first)
    else
      redis.call('HINCRBY', w.key, 't', units)
      if not w.first then
        w.first = w.head
        redis.call('HSET', w.key, 'f', w.first)
      end
    end
    -- A bucket's first write moves the key's lifetime: it must outlive the newest bucket, which
    -- counts until (head + 1) * width + length (later than now + length + width only when the
    -- head is ahead of this gateway's clock). Later writes of the same bucket need not move it.
    if count == units then
      redis.call('PEXPIRE', w.key, math.max(w.length + w.width,
        (w.head + 1) * w.width + w.length - now))
      moved = true
    end
  end
  if qlimit >= 0 and not hard then
    reserved_overage = math.max(0, used + units - math.max(qlimit, used))
  end
  used = used + units
  overage = overage + reserved_overage
  -- A call decided before the hash was made (by a clock behind the creator's, or a late one)
  -- has its event among the ledger's before a: it counts in p.
  local early = made and now < made
  redis.call('HINCRBY', qkey, 'u', units)
  version = redis.call('HINCRBY', qkey, 'v', 1)
  if early then
    redis.call('HINCRBY', qkey, 'p', units)
  end
  if reserved_overage > 0 then
    redis.call('HINCRBY', qkey, 'o', reserved_overage)
    if early then
      redis.call('HINCRBY', qkey, 'q', reserved_overage)
    end
  end
  if moved then
    redis.call('PEXPIRE', qkey, qttl)
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
    if target == w.total - 1 and w.first then
      -- One unit fewer is enough: the oldest bucket holding units ends it.
      reset = (w.first + 1) * w.width + w.length - now
    else
      local counted = w.total
      reset = w.length
      for k, count in ipairs(buckets(w.key, w.head - slots, w.head)) do
        if count > 0 then
          counted = counted - count
          if counted <= target then
            reset = (w.head - slots + k) * w.width + w.length - now
            break
          end
        end
      end
    end
  end
  out[#out + 1] = math.max(0, w.limit - w.total)
  out[#out + 1] = reset
end
out[#out + 1] = quota[3] == '1' and 1 or 0
out[#out + 1] = generation
out[#out + 1] = version
-- %d: Lua's own number format would write 1e+15 for a window of 10^15.
return string.rep('%d ', #out):format(unpack(out))
