-- At the opening: freezes the pre-queue (no ticket joins it after this) and
-- returns its tickets for the draw. Idempotent until the draw is written, so
-- a replica that died mid-draw leaves it to the next.
--
-- ARGV now_ms
-- Returns {'waiting'} before the opening, {'drawn'} once drawn,
-- {'no_room'}, or {'frozen', ticket...}.
local c = redis.call('HMGET', conf, 'state', 'opens_ms')
if not c[1] then
  return {'no_room'}
end
if c[1] == 'drawn' then
  return {'drawn'}
end
if c[1] == 'prequeue' then
  if tonumber(ARGV[1]) < tonumber(c[2]) then
    return {'waiting'}
  end
  redis.call('HSET', conf, 'state', 'frozen', 'next_pos', redis.call('SCARD', pre))
end
local answer = redis.call('SMEMBERS', pre)
table.insert(answer, 1, 'frozen')
return answer
