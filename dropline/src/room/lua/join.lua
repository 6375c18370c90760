-- A buyer joins the line, or is given back the ticket they hold.
--
-- Before the opening a new ticket goes into the pre-queue, to be placed by
-- the draw; from the opening on it goes to the back of the line. The first
-- join at or after the opening freezes the pre-queue if the keeper has not
-- yet (so which tickets the draw covers is decided here, atomically, and
-- never by a replica's clock alone). A buyer whose turn ran out gets a new
-- ticket at the back.
--
-- A lottery takes entries until the opening only.
--
-- ARGV user, fresh ticket id, now_ms
-- Returns {'joined', ticket} | {'existing', ticket} | {'no_room'} |
--         {'not_open', prequeue_ms} | {'closed'} | {'entries_closed'}
local user, fresh, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local c = redis.call('HMGET', conf, 'state', 'prequeue_ms', 'opens_ms', 'closes_ms', 'mode')
if not c[1] then
  return {'no_room'}
end
if now < tonumber(c[2]) then
  return {'not_open', c[2]}
end
if now >= tonumber(c[4]) then
  return {'closed'}
end
local held = redis.call('HGET', users, user)
if held and redis.call('HGET', ended, held) ~= 'lapsed' then
  return {'existing', held}
end
local state = c[1]
if c[5] == 'lottery' and (state ~= 'prequeue' or now >= tonumber(c[3])) then
  return {'entries_closed'}
end
if state == 'prequeue' and now >= tonumber(c[3]) then
  state = 'frozen'
  redis.call('HSET', conf, 'state', state, 'next_pos', redis.call('SCARD', pre))
end
if state == 'prequeue' then
  redis.call('SADD', pre, fresh)
  retain(pre)
else
  local place = redis.call('HINCRBY', conf, 'next_pos', 1)
  redis.call('ZADD', line, place, fresh)
  retain(line)
end
redis.call('HSET', users, user, fresh)
retain(users)
return {'joined', fresh}
