-- A buyer acted on their turn: a purchase with their admission was
-- accepted. Their turn ends, so the stock it kept aside goes to the next.
--
-- ARGV ticket
-- Returns 1 when the turn was open, 0 otherwise.
if redis.call('ZREM', admitted, ARGV[1]) == 0 then
  return 0
end
redis.call('HSET', ended, ARGV[1], 'used')
retain(ended)
return 1
