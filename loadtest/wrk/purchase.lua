-- wrk script for the ingress figure and its ceiling: POSTs purchases with a
-- bearer token (WRK_TOKEN) and a fresh Idempotency-Key each, and counts the
-- answers by status so the report can use the 202s only.
--   WRK_TOKEN=... wrk -t2 -c64 -d10s -s loadtest/wrk/purchase.lua http://127.0.0.1:8080/v1/events/1/purchases
local token = os.getenv("WRK_TOKEN") or ""
local threads = {}

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  n = 0
  statuses = {}
  prefix = string.format("wrk-%d-%d-", id, os.time())
end

function request()
  n = n + 1
  return wrk.format("POST", nil, {
    ["Authorization"] = "Bearer " .. token,
    ["Content-Type"] = "application/json",
    ["Idempotency-Key"] = prefix .. n,
  }, '{"quantity":1}')
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local total = {}
  for _, t in ipairs(threads) do
    local s = t:get("statuses")
    for code, count in pairs(s) do
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
