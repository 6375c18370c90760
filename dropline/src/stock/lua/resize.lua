-- Sets an event's capacity and oversell allowance while its sale runs: the
-- host adds stock, or takes back stock nobody was ever given.
--
-- KEYS[1] stock hash, KEYS[2] fence
-- ARGV[1] the capacity wanted, ARGV[2] the oversell allowance wanted
--
-- Returns {'resized', capacity + allowance, available} once the ledger has
-- them (now, or already: a retried call changes nothing), or
-- {'in_use', handed_out, 0} when the units it may sell would drop below the
-- units already handed out: unit numbers 1 to next_unit - 1 have been held
-- at some point (some may be free again, but their numbers live on in the
-- record), so capacity + allowance never goes below them.
--
-- available counts the free units plus the never-used ones (capacity +
-- allowance - next_unit + 1): moving the sum by d moves available by d, and
-- the two still agree afterwards, as allocate.lua checks before every
-- decision.
local stock, fence = KEYS[1], KEYS[2]

local refused = refuse_unless_ledger(stock, fence)
if refused then
  return refused
end

local f = redis.call('HMGET', stock, 'capacity', 'available', 'next_unit', 'allowance')
local available, next_unit = tonumber(f[2]), tonumber(f[3])
if not next_unit then
  return redis.error_reply('CORRUPT the ledger has no unit numbers')
end
local sellable = tonumber(f[1]) + tonumber(f[4] or '0')
local capacity, allowance = tonumber(ARGV[1]), tonumber(ARGV[2])
local wanted = capacity + allowance
local handed_out = next_unit - 1
if wanted < handed_out then
  return {'in_use', handed_out, 0}
end
local delta = wanted - sellable
redis.call('HSET', stock, 'capacity', capacity, 'allowance', allowance)
if delta ~= 0 then
  redis.call('HINCRBY', stock, 'available', delta)
end
return {'resized', wanted, available + delta}
