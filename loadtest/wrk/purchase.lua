-- wrk script for the ingress figures and their ceiling: POSTs purchases
-- with one bearer token (WRK_TOKEN) and a fresh Idempotency-Key each.
--   WRK_TOKEN=... wrk -t2 -c256 -d15s -s loadtest/wrk/purchase.lua http://127.0.0.1:8080/v1/events/1/purchases
-- Run from the repository's root (the shared tally is loaded from there).
package.path = "loadtest/wrk/?.lua;" .. package.path
local tally = require("tally")
local token = os.getenv("WRK_TOKEN") or ""

setup = tally.setup
response = tally.response
done = tally.done

function init(args)
  tally.init()
  n = 0
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
