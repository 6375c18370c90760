-- Records the ingress' refusal of a purchase at the door (sold out, sale not
-- open or closed) as what its intent must be decided, should a copy of the
-- intent be on Kafka after all: a request whose idempotency record Redis lost
-- looks new to the ingress, and its first copy may still be undecided. The
-- allocator reads this before deciding, so the buyer is never told no at the
-- door while the first copy takes a ticket.
--
-- KEYS[1] stock hash, KEYS[2] decisions hash, KEYS[3] fence,
-- KEYS[4] refused hash  intent id -> reason, kept apart from the decisions
--                       so that a rebuild (which rewrites the decisions from
--                       MySQL) does not wipe refusals whose intents are still
--                       in flight
-- ARGV[1] intent id, ARGV[2] reason
--
-- Returns {'refused', reason} when the refusal stands (now or from an earlier
-- call), or {'decided', decision JSON} when the intent was decided already:
-- then the door must not refuse, the decision stands.
local stock, decisions, fence, refused = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local id, reason = ARGV[1], ARGV[2]

-- A missing or fenced ledger cannot say whether the intent was decided.
local refusal = refuse_unless_ledger(stock, fence)
if refusal then
  return refusal
end

local decision = redis.call('HGET', decisions, id)
if decision then
  return {'decided', decision}
end
local earlier = redis.call('HGET', refused, id)
if earlier then
  return {'refused', earlier}
end
redis.call('HSET', refused, id, reason)
redis.call('PEXPIREAT', refused, redis.call('HGET', stock, 'retain_ms'), 'NX')
return {'refused', reason}
