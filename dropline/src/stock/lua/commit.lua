-- Puts a staged rebuild of an event's ledger in place, only while the
-- rebuild still holds the event's fence: checked and applied in one step,
-- so no retry of the call (a cluster client resends a call whose answer it
-- lost, possibly to a newly promoted primary) can apply it without the
-- fence, and no reader sees half of it.
--
-- KEYS[1] the fence
-- KEYS[2..6] the ledger's stock, users, decisions, holds and free units
-- KEYS[7..11] their staged copies, in the same order (the staged stock is
--             always written: while it exists, the rebuild is not applied)
-- ARGV[1] the rebuild's fence token, ARGV[2] when the ledger's keys expire
--         (Unix ms)
--
-- Returns 1 once the staged ledger is in place (now, or by an earlier copy
-- of this call), 0 when the fence is not the rebuild's: the staged copies
-- are dropped and the ledger is left as it was.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  for i = 7, 11 do
    redis.call('DEL', KEYS[i])
  end
  return 0
end
if redis.call('EXISTS', KEYS[7]) == 0 then
  return 1
end
for i = 2, 6 do
  redis.call('DEL', KEYS[i])
  if redis.call('EXISTS', KEYS[i + 5]) == 1 then
    redis.call('RENAME', KEYS[i + 5], KEYS[i])
    redis.call('PEXPIREAT', KEYS[i], ARGV[2])
  end
end
return 1
