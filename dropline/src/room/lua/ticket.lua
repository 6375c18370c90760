-- Where a buyer stands.
--
-- ARGV user
-- Returns false when the room does not exist, else
-- {state, ticket|'', place|'', serving, deadline|'', ended|'', available,
--  outflow, oldest sample|'', newest sample|''}
local c = redis.call('HMGET', conf, 'state', 'serving', 'outflow')
if not c[1] then
  return false
end
local ticket = redis.call('HGET', users, ARGV[1]) or ''
local place, deadline, ending = '', '', ''
if ticket ~= '' then
  place = redis.call('ZSCORE', line, ticket) or ''
  deadline = redis.call('ZSCORE', admitted, ticket) or ''
  ending = redis.call('HGET', ended, ticket) or ''
end
return {c[1], ticket, place, c[2], deadline, ending, redis.call('HGET', stock, 'available') or '0', c[3],
  redis.call('LINDEX', samples, -1) or '', redis.call('LINDEX', samples, 0) or ''}
