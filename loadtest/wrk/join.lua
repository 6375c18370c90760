-- wrk script for the queue-join figure and its ceiling: POSTs a join for a
-- different buyer each time, with the bearer tokens of WRK_TOKENS_FILE (one
-- per line, from `dropctl token --user ... --count N`). Thread i of
-- WRK_THREADS takes lines i, i + WRK_THREADS, ...; a thread that runs out
-- starts over (a join again answers the same ticket, which is cheaper), so
-- the bench mints more tokens than the run can use and checks it did.
--   WRK_TOKENS_FILE=tokens WRK_THREADS=2 wrk -t2 -c256 -d15s -s loadtest/wrk/join.lua http://127.0.0.1:8080/v1/events/1/queue
package.path = "loadtest/wrk/?.lua;" .. package.path
local tally = require("tally")

setup = tally.setup
response = tally.response

function init(args)
  tally.init()
  local stride = tonumber(os.getenv("WRK_THREADS") or "1")
  tokens = {}
  local line_no = 0
  for line in io.lines(os.getenv("WRK_TOKENS_FILE")) do
    if line_no % stride == id then
      table.insert(tokens, line)
    end
    line_no = line_no + 1
  end
  next_token = 0
end

function request()
  next_token = next_token + 1
  if next_token > #tokens then
    next_token = 1
  end
  return wrk.format("POST", nil, { ["Authorization"] = "Bearer " .. tokens[next_token] })
end

done = tally.done
