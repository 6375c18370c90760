-- A buyer acted on their turn: a purchase with their admission was
-- accepted. The turn ends; until the purchase is decided, the stock it will
-- take stays spoken for (see advance.lua), so nobody else is let through for
-- it in the meantime.
--
-- ARGV ticket, intent id
-- Returns 1 when the turn was open, 0 otherwise.
if redis.call('ZREM', admitted, ARGV[1]) == 0 then
  return 0
end
redis.call('HSET', ended, ARGV[1], 'used')
redis.call('HSET', pending, ARGV[1], ARGV[2])
retain(ended, pending)
return 1
