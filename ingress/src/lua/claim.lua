-- Claims an Idempotency-Key for one request, atomically: the first request
-- with a key records it as "busy", owned by that request for a short lease;
-- every other request with the key learns at once what to do.
--
-- KEYS[1] the key's record (one per buyer and key)
-- ARGV[1] the record to write for a new key (JSON, without its lease)
-- ARGV[2] the intent id this request maps to (event, buyer and key)
-- ARGV[3] the quantity asked for
-- ARGV[4] this request's owner token
-- ARGV[5] the lease, ms
-- ARGV[6] how long the record is kept, s
--
-- Returns {outcome, record JSON, lease ms left}:
--   'new'       the key was unknown; this request owns it now
--   'takeover'  the key's owner let its lease run out (it crashed, or its
--               broker call failed): this request owns it now, and must
--               produce the intent again, since it may be on Kafka already
--   'busy'      another request owns the key and its lease runs on
--   'final'     the key has its final answer, to be replayed
--   'reused'    the key was first used for another event or quantity
-- Time is Redis' own clock, the same for every ingress.
local key = KEYS[1]
local fresh, id, qty, owner = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local lease_ms, keep_secs = tonumber(ARGV[5]), ARGV[6]

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local raw = redis.call('GET', key)
if not raw then
  local r = cjson.decode(fresh)
  r.st, r.own, r['until'] = 'busy', owner, now + lease_ms
  local encoded = cjson.encode(r)
  redis.call('SET', key, encoded, 'EX', keep_secs)
  return {'new', encoded, '0'}
end

local r = cjson.decode(raw)
if r.id ~= id or r.q ~= qty then
  return {'reused', raw, '0'}
end
if r.st ~= 'busy' then
  return {'final', raw, '0'}
end
if now < r['until'] then
  return {'busy', raw, tostring(r['until'] - now)}
end
r.own, r['until'] = owner, now + lease_ms
local encoded = cjson.encode(r)
redis.call('SET', key, encoded, 'EX', keep_secs)
return {'takeover', encoded, '0'}
