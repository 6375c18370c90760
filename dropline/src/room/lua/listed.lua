-- Publishes the frozen pre-queue's list hash, before the seed: a draw that
-- waits for a beacon round shows it while it waits.
--
-- ARGV list_hash
-- Returns 1 when published now or before, 0 when the room is not frozen.
local refusal = refuse_unless_frozen_with(ARGV[1])
if refusal then
  return refusal
end
redis.call('HSET', conf, 'list_hash', ARGV[1])
return 1
