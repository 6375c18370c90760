-- Loads an event's stock ledger into Redis before its sale opens.
--
-- KEYS[1] stock hash
-- ARGV    capacity, per_user_limit, hold_ttl_ms, opens_at_ms, closes_at_ms,
--         price_cents, retain_until_ms, paused (1 or 0), oversell_allowance
--
-- Unit numbers run from 1 to capacity + oversell_allowance: that many are
-- available at first.
--
-- Never overwrites a ledger that already exists: pre-warming twice, or after
-- the sale started, must not hand out the same stock again. Returns 1 when the
-- ledger was created and 0 when it was already there.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1],
  'capacity', ARGV[1],
  'allowance', ARGV[9],
  'available', tonumber(ARGV[1]) + tonumber(ARGV[9]),
  'held', 0,
  'sold', 0,
  'next_unit', 1,
  'limit', ARGV[2],
  'ttl_ms', ARGV[3],
  'opens_ms', ARGV[4],
  'closes_ms', ARGV[5],
  'price', ARGV[6],
  'retain_ms', ARGV[7],
  'paused', ARGV[8])
redis.call('PEXPIREAT', KEYS[1], ARGV[7])
return 1
