-- Shared by Dropline's wrk scripts: counts the answers by status in every
-- thread and prints one line the bench reads (WRK_JSON {...}): duration,
-- requests, p50/p99 latency and the count of each status, so a figure can
-- be made of the answers that mean what it measures (the 202s of accepted
-- purchases, the 409s of refusals) and nothing else.
local tally = {}
local threads = {}

function tally.setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function tally.init()
  statuses = {}
end

function tally.response(status)
  statuses[status] = (statuses[status] or 0) + 1
end

function tally.done(summary, latency)
  local total = {}
  for _, t in ipairs(threads) do
    for code, count in pairs(t:get("statuses")) do
      total[code] = (total[code] or 0) + count
    end
  end
  local parts = {}
  for code, count in pairs(total) do
    table.insert(parts, string.format('"%d": %d', code, count))
  end
  io.write(string.format('WRK_JSON {"secs": %f, "requests": %d, "p50_ms": %f, "p99_ms": %f, "statuses": {%s}}\n',
    summary.duration / 1e6, summary.requests, latency:percentile(50) / 1e3, latency:percentile(99) / 1e3,
    table.concat(parts, ", ")))
end

return tally
