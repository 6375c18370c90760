-- Moves a key's record out of "busy", on behalf of the request that owns it:
-- to its final answer, or back to "free to take over" when the request ends
-- without one (its broker call failed: the intent may be on Kafka, so the
-- next request must produce it again rather than refuse it at the door).
--
-- KEYS[1] the key's record
-- ARGV[1] the owner token
-- ARGV[2] the final record (JSON), or '' to give the lease up
-- ARGV[3] how long the record is kept, s
--
-- Returns {outcome, record JSON}:
--   'done'  the record is now as asked
--   'lost'  this request no longer owns the key (its lease ran out and
--           another request took over, which may have answered already):
--           nothing is written; the caller answers from the record returned
--   'gone'  no record (Redis lost it) and nothing to write
-- A final answer is written even when the record is gone: it is the truth,
-- and a retry must get it.
local key = KEYS[1]
local owner, final, keep_secs = ARGV[1], ARGV[2], ARGV[3]

local raw = redis.call('GET', key)
if not raw then
  if final == '' then
    return {'gone', ''}
  end
  redis.call('SET', key, final, 'EX', keep_secs)
  return {'done', final}
end

local r = cjson.decode(raw)
if r.st ~= 'busy' or r.own ~= owner then
  return {'lost', raw}
end
if final == '' then
  r['until'] = 0
  final = cjson.encode(r)
end
redis.call('SET', key, final, 'EX', keep_secs)
return {'done', final}
