-- Writes the draw: the frozen pre-queue's tickets take places 1..n in the
-- order given, and the list hash and the seed are published. Only the first
-- call after a freeze writes; arrivals since the freeze already hold places
-- n+1 and on.
--
-- ARGV list_hash, seed (hex), now_ms, ticket... (first place first)
-- Returns 1 when this call drew, 0 when the room was not frozen.
local refusal = refuse_unless_frozen_with(ARGV[1])
if refusal then
  return refusal
end
local n = #ARGV - 3
if n ~= redis.call('SCARD', pre) then
  return redis.error_reply('DRAW the order has ' .. n .. ' tickets, the pre-queue ' .. redis.call('SCARD', pre))
end
local batch = {}
for i = 1, n do
  batch[#batch + 1] = i
  batch[#batch + 1] = ARGV[i + 3]
  if #batch == 1000 or i == n then
    redis.call('ZADD', line, unpack(batch))
    batch = {}
  end
end
if n > 0 then
  retain(line)
end
redis.call('HSET', conf, 'state', 'drawn', 'list_hash', ARGV[1], 'seed', ARGV[2], 'drawn_ms', ARGV[3],
  'entrants', n, 'last_ms', ARGV[3], 'carry', 0)
-- A lottery's winners are let through all at once (see advance.lua).
if redis.call('HGET', conf, 'mode') == 'lottery' then
  redis.call('HSET', conf, 'burst', 1)
end
return 1
