-- The keys every waiting-room script is handed, in this order (see
-- RoomKeys::all). All share the event's hash tag.
local conf, pre, line, users, admitted, ended, samples, pending, stock, decisions =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10]

-- The room's keys (not the stock) live as long as the room's settings say.
local function retain(...)
  local at = redis.call('HGET', conf, 'retain_ms')
  for _, key in ipairs({...}) do
    redis.call('PEXPIREAT', key, at)
  end
end

-- What a script given `list_hash` for a frozen pre-queue must answer
-- instead of going on: 0 when the room is not frozen, an error when another
-- list hash was published; nil when it may go on.
local function refuse_unless_frozen_with(list_hash)
  if redis.call('HGET', conf, 'state') ~= 'frozen' then
    return 0
  end
  local published = redis.call('HGET', conf, 'list_hash')
  if published and published ~= list_hash then
    return redis.error_reply('DRAW list hash ' .. list_hash .. ' differs from the published ' .. published)
  end
end
