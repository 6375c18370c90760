-- Sets an event's capacity while its sale runs: the host adds stock, or
-- takes back stock nobody was ever given.
--
-- KEYS[1] stock hash, KEYS[2] fence
-- ARGV[1] the capacity wanted
--
-- Returns {'resized', capacity, available} once the ledger has that
-- capacity (now, or already: a retried call changes nothing), or
-- {'in_use', handed_out, 0} when it would drop units already handed out: unit
-- numbers 1 to next_unit - 1 have been held at some point (some may be free
-- again, but their numbers live on in the record), so the capacity never
-- goes below them.
--
-- available counts the free units plus the never-used ones (capacity -
-- next_unit + 1): moving capacity by d moves available by d, and the two
-- still agree afterwards, as allocate.lua checks before every decision.
local stock, fence = KEYS[1], KEYS[2]

local refused = refuse_unless_ledger(stock, fence)
if refused then
  return refused
end

local f = redis.call('HMGET', stock, 'capacity', 'available', 'next_unit')
local capacity, available, next_unit = tonumber(f[1]), tonumber(f[2]), tonumber(f[3])
if not next_unit then
  return redis.error_reply('CORRUPT the ledger has no unit numbers')
end
local wanted = tonumber(ARGV[1])
if wanted == capacity then
  return {'resized', capacity, available}
end
local handed_out = next_unit - 1
if wanted < handed_out then
  return {'in_use', handed_out, 0}
end
local delta = wanted - capacity
redis.call('HINCRBY', stock, 'capacity', delta)
redis.call('HINCRBY', stock, 'available', delta)
return {'resized', wanted, available + delta}
