-- Decides a batch of purchase intents for one event, atomically.
--
-- KEYS[1] stock hash      capacity/available/held/sold and the sale's rules
-- KEYS[2] users hash      user id -> units the user holds or bought
-- KEYS[3] decisions hash  intent id -> decision (JSON), the redelivery guard
-- KEYS[4] holds hash      order id -> hold (JSON)
-- KEYS[5] fence           present while the ledger is being rebuilt
-- KEYS[6] free units      list of unit numbers released by ended holds
-- KEYS[7] refused hash    intent id -> reason the ingress refused it at the
--                         door with (door.lua); such an intent is rejected
--                         for that reason, whatever the stock
-- ARGV    intent_id, user_id, quantity, repeated once per intent
--
-- Returns one decision (JSON) per intent, in ARGV order.
--
-- Every check happens before any write, inside one script, so no interleaving
-- can decrement stock that is not there. A redelivered intent finds its
-- earlier decision and gets it again, unchanged: it never takes stock twice.
-- The order id is the intent id, so a redelivery cannot mint a second order.
-- An intent the ingress refused at the door (a retry whose idempotency record
-- Redis had lost, while its first copy was still on Kafka) gets the door's
-- answer: the buyer was told no, so it must not take stock.
-- Each hold gets unit numbers from 1 to capacity + allowance (the units the
-- host accepts to oversell, absent: none): released ones first, then
-- never-used ones. MySQL keeps a unit to one live order, so a ledger that
-- lost writes and hands a unit out again is caught there.
-- Time is Redis' own clock, the one clock that pay, cancel and expire use too.
local stock, users, decisions, holds, fence, free, at_door = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6],
  KEYS[7]

local refused = refuse_unless_ledger(stock, fence)
if refused then
  return refused
end

local f = redis.call('HMGET', stock, 'available', 'limit', 'ttl_ms', 'opens_ms', 'closes_ms', 'price', 'retain_ms',
  'next_unit', 'capacity', 'paused', 'allowance')
local available = tonumber(f[1])
local limit = tonumber(f[2])
local ttl_ms = tonumber(f[3])
local opens_ms = tonumber(f[4])
local closes_ms = tonumber(f[5])
local price = tonumber(f[6])
local retain_ms = f[7]
local next_unit = tonumber(f[8])
-- Every unit it may sell: the capacity and the oversell allowance.
local sellable = tonumber(f[9]) + tonumber(f[11] or '0')
-- Paused by its host (absent in a ledger from before pauses: running).
local paused = f[10] == '1'
local unused = redis.call('LLEN', free)

-- Takes n unit numbers; the checks above guarantee there are n to take.
local function take_units(n)
  local units = {}
  local reused = math.min(n, unused)
  if reused > 0 then
    for _, u in ipairs(redis.call('LPOP', free, reused)) do
      units[#units + 1] = tonumber(u)
    end
    unused = unused - reused
  end
  for _ = #units + 1, n do
    units[#units + 1] = next_unit
    next_unit = next_unit + 1
  end
  return units
end

-- available counts the same units as the free list plus the never-used
-- ones; if they disagree (or the ledger predates unit numbers) it is
-- damaged and must not decide: the reconciler rebuilds it.
if not next_unit then
  return redis.error_reply('CORRUPT the ledger has no unit numbers')
end
if available ~= unused + sellable - next_unit + 1 then
  return redis.error_reply('CORRUPT available ' .. available .. ' does not match the free units')
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local taken = 0
local out = {}
for i = 1, #ARGV, 3 do
  local id, user, qty = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local decision = redis.call('HGET', decisions, id)
  if not decision then
    local reason = redis.call('HGET', at_door, id)
    if reason then
      -- Refused at the door: that answer stands.
    elseif now < opens_ms then
      reason = 'sale_not_open'
    elseif now >= closes_ms then
      reason = 'sale_closed'
    elseif paused then
      reason = 'sale_paused'
    else
      local owned = tonumber(redis.call('HGET', users, user) or '0')
      if owned + qty > limit then
        reason = 'limit_reached'
      elseif qty > available then
        reason = 'sold_out'
      end
    end
    if reason then
      decision = cjson.encode({o = 'rejected', r = reason, at = now})
    else
      local exp = now + ttl_ms
      local units = take_units(qty)
      available = available - qty
      taken = taken + qty
      redis.call('HINCRBY', users, user, qty)
      redis.call('HSET', holds, id,
        cjson.encode({u = user, q = qty, a = price * qty, s = 'held', exp = exp, n = units}))
      decision = cjson.encode({o = 'held', exp = exp, a = price * qty, at = now, n = units})
    end
    redis.call('HSET', decisions, id, decision)
  end
  out[#out + 1] = decision
end

if taken > 0 then
  redis.call('HINCRBY', stock, 'available', -taken)
  redis.call('HINCRBY', stock, 'held', taken)
  redis.call('HSET', stock, 'next_unit', next_unit)
end
-- The bookkeeping hashes live as long as the ledger. NX keeps the first
-- expiry, so this costs nothing after the first call.
for _, key in ipairs({users, decisions, holds, free}) do
  redis.call('PEXPIREAT', key, retain_ms, 'NX')
end
return out
