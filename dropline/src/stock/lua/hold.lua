-- Moves one hold out of 'held': pay, cancel or expire. The single place where
-- a hold ends, so a hold ends exactly once and stock comes back exactly once.
-- Also the one place a held hold changes: 'start' (the buyer started paying)
-- extends its deadline, once.
--
-- KEYS[1] stock hash, KEYS[2] users hash, KEYS[3] holds hash, KEYS[4] fence,
-- KEYS[5] free units list
-- ARGV[1] 'pay' | 'cancel' | 'expire' | 'start' | 'cancel_paid'
-- ARGV[2] order id
-- ARGV[3] pay: the payment id; cancel, cancel_paid: the user asking; start:
--         the extension in milliseconds; expire: unused
-- ARGV[4] cancel_paid: the cents refunded (the event's policy's share)
--
-- Returns {outcome, hold JSON}:
--   pay     'paid'      the hold is paid by this payment (also on redelivery)
--           'refund'    the money must go back: the hold had expired, was
--                       cancelled, or was paid by another payment
--   cancel  'cancelled' | 'expired' | 'paid' | 'voided'
--   expire  'expired' | 'cancelled' | 'paid' | 'voided' (the state it ended in), or
--           'not_due' while the deadline is still ahead
--   cancel_paid 'cancelled' (now, or earlier: a retry) or the state it is in:
--           a paid order goes back on sale, its refund noted ('rf')
--   start   the state the hold is in: 'held' (extended now, or on an earlier
--           start: the field 'ps' says when) or the state it ended in
--   any     'unknown'   no such hold (or, for cancel, not the user's)
-- A hold whose deadline passed is expired by whichever call sees it first, so
-- a payment racing the expirer can never leave a hold both paid and expired.
local stock, users, holds, fence, free = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local op, id, arg = ARGV[1], ARGV[2], ARGV[3]

-- A missing or fenced ledger cannot say whether the hold exists: refuse,
-- so callers retry instead of taking "unknown" for an answer.
local refused = refuse_unless_ledger(stock, fence)
if refused then
  return refused
end

local raw = redis.call('HGET', holds, id)
if not raw then
  return {'unknown', ''}
end
local h = cjson.decode(raw)
if (op == 'cancel' or op == 'cancel_paid') and h.u ~= arg then
  return {'unknown', ''}
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- The hold's units go back on sale, from the count they were in.
local function put_back(from)
  redis.call('HINCRBY', stock, from, -h.q)
  redis.call('HINCRBY', stock, 'available', h.q)
  redis.call('HINCRBY', users, h.u, -h.q)
  -- The units go back for the next buyer.
  if h.n and #h.n > 0 then
    redis.call('RPUSH', free, unpack(h.n))
    redis.call('PEXPIREAT', free, redis.call('HGET', stock, 'retain_ms'), 'NX')
  end
end

local function finish(state)
  h.s = state
  h['end'] = now
  if state == 'paid' then
    redis.call('HINCRBY', stock, 'held', -h.q)
    redis.call('HINCRBY', stock, 'sold', h.q)
  else
    put_back('held')
  end
end

if h.s == 'held' and now >= h.exp then
  finish('expired')
end

local outcome
if op == 'pay' then
  if h.s == 'held' then
    finish('paid')
    h.pay = arg
    outcome = 'paid'
  elseif h.s == 'paid' and h.pay == arg then
    outcome = 'paid'
  else
    outcome = 'refund'
  end
elseif op == 'cancel' then
  if h.s == 'held' then
    finish('cancelled')
  end
  outcome = h.s
elseif op == 'cancel_paid' then
  -- Within the event's policy (the caller checked it): the paid order ends
  -- cancelled, its units are on sale again, and its refund is noted.
  if h.s == 'paid' then
    h.s = 'cancelled'
    h['end'] = now
    h.rf = math.max(0, math.floor(tonumber(ARGV[4]) or 0))
    put_back('sold')
  end
  outcome = h.s
elseif op == 'start' then
  -- Once per hold: a retried start, or a second payment attempt after a
  -- decline, finds 'ps' set and leaves the deadline as it is.
  if h.s == 'held' and not h.ps then
    h.ps = now
    h.exp = h.exp + math.max(0, math.floor(tonumber(arg) or 0))
  end
  outcome = h.s
elseif op == 'expire' then
  if h.s == 'held' then
    return {'not_due', tostring(h.exp - now)}
  end
  outcome = h.s
else
  return redis.error_reply('BADOP unknown hold operation')
end

local encoded = cjson.encode(h)
if encoded ~= raw then
  redis.call('HSET', holds, id, encoded)
end
return {outcome, encoded}
