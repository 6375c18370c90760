-- A purchase made with a turn was accepted. The turn ends (a turn buys
-- once), and until the purchase is decided the units it asked for stay
-- spoken for (see advance.lua), so nobody else is let through for them in
-- the meantime. A purchase that raced another with the same turn is counted
-- too.
--
-- ARGV ticket, intent id, quantity
-- Returns 1 when the turn was open, 0 otherwise.
redis.call('HSET', pending, ARGV[2], ARGV[3])
retain(pending)
if redis.call('ZREM', admitted, ARGV[1]) == 0 then
  return 0
end
redis.call('HSET', ended, ARGV[1], 'used')
retain(ended)
return 1
