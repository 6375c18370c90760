-- Sets up a waiting room, once: a second call (another replica, a retry, the
-- keeper restoring a room) leaves the first one as it is.
--
-- A room Redis lost after its draw comes back drawn, with an empty line:
-- the draw's order is gone with it (its seed and list hash stay on the
-- record), and buyers join again at the back.
--
-- ARGV prequeue_ms, opens_ms, closes_ms, outflow, tta_ms, retain_ms,
--      mode (fcfs | lottery), drawn (1 when the record has the draw), now_ms
-- Returns 1 when the room was created, 0 when it existed.
if redis.call('EXISTS', conf) == 1 then
  return 0
end
redis.call('HSET', conf,
  'state', 'prequeue',
  'prequeue_ms', ARGV[1],
  'opens_ms', ARGV[2],
  'closes_ms', ARGV[3],
  'outflow', ARGV[4],
  'tta_ms', ARGV[5],
  'retain_ms', ARGV[6],
  'next_pos', 0,
  'serving', 0,
  'last_ms', 0,
  'carry', 0,
  'mode', ARGV[7])
if ARGV[8] == '1' then
  redis.call('HSET', conf, 'state', 'drawn', 'entrants', 0, 'last_ms', ARGV[9], 'lost_ms', ARGV[9])
end
redis.call('PEXPIREAT', conf, ARGV[6])
return 1
