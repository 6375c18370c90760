-- Lets buyers through, in order: as many as the outflow allows since the
-- last call (a token bucket holding at most one second's worth), and only
-- while the stock has more units than are spoken for: by admitted buyers yet
-- to act, and by purchases made with a turn and not decided yet.
-- Ends the turns whose time ran out first. Right after a lottery's draw, the
-- bucket is ignored once: every winner is let through at once. Every replica calls it; the bucket
-- lives here, so together they never let more through than the outflow.
--
-- ARGV now_ms
-- Returns {admitted now, turns ended now, now serving, units available,
--          tickets still waiting, oldest rate sample|'', newest|''}; units
--          available is -1 until the room is drawn.
local now = tonumber(ARGV[1])
local c = redis.call('HMGET', conf, 'state', 'outflow', 'tta_ms', 'serving', 'next_pos', 'last_ms', 'carry')
if c[1] ~= 'drawn' then
  return {0, 0, 0, -1, -1, '', ''}
end
local outflow, tta, serving, next_pos = tonumber(c[2]), tonumber(c[3]), tonumber(c[4]), tonumber(c[5])

local lapsed = redis.call('ZRANGEBYSCORE', admitted, '-inf', now)
for _, ticket in ipairs(lapsed) do
  redis.call('HSET', ended, ticket, 'lapsed')
end
if #lapsed > 0 then
  redis.call('ZREMRANGEBYSCORE', admitted, '-inf', now)
  retain(ended)
end

-- Units asked for by purchases made with a turn and not decided yet. The
-- decided ones are out of the stock's count by now: forgotten here.
local undecided = 0
local waiting = redis.call('HGETALL', pending)
for i = 1, #waiting, 2 do
  if redis.call('HEXISTS', decisions, waiting[i]) == 1 then
    redis.call('HDEL', pending, waiting[i])
  else
    undecided = undecided + tonumber(waiting[i + 1])
  end
end

local allowance = tonumber(c[7]) + math.max(0, now - tonumber(c[6])) * outflow / 1000
if allowance > outflow then
  allowance = outflow
end
local available = tonumber(redis.call('HGET', stock, 'available') or '0')
local spoken_for = redis.call('ZCARD', admitted) + undecided
if redis.call('HGET', conf, 'burst') == '1' then
  allowance = math.max(allowance, available - spoken_for)
  redis.call('HDEL', conf, 'burst')
end
local n = math.min(math.floor(allowance), available - spoken_for, next_pos - serving)
if n > 0 then
  local turns = redis.call('ZRANGEBYSCORE', line, '(' .. serving, serving + n)
  for _, ticket in ipairs(turns) do
    redis.call('ZADD', admitted, now + tta, ticket)
  end
  retain(admitted)
  serving = serving + n
  allowance = allowance - n
else
  n = 0
end
redis.call('HSET', conf, 'serving', serving, 'last_ms', now, 'carry', allowance)

-- One sample a second, ten kept: the outflow as measured, for wait estimates.
local newest = redis.call('LINDEX', samples, 0)
if not newest or now - tonumber(string.match(newest, '^(%d+)')) >= 1000 then
  redis.call('LPUSH', samples, now .. ':' .. serving)
  redis.call('LTRIM', samples, 0, 9)
  retain(samples)
end
return {n, #lapsed, serving, available, next_pos - serving,
  redis.call('LINDEX', samples, -1) or '', redis.call('LINDEX', samples, 0) or ''}
