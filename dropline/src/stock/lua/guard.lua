-- Shared by the scripts that decide or end holds (prepended when they are
-- loaded). Deciding on a ledger that is missing or being rebuilt would be
-- guessing: refuse, and the caller retries later.
local function refuse_unless_ledger(stock, fence)
  if redis.call('EXISTS', fence) == 1 then
    return redis.error_reply('FENCED the event ledger is being rebuilt')
  end
  if redis.call('EXISTS', stock) == 0 then
    return redis.error_reply('NOLEDGER the event has no stock ledger in redis')
  end
  return nil
end

