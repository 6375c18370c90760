-- wrk script for the read figures and their ceiling: GETs the URL it is
-- given, as an anonymous buyer's app does for an event's detail and
-- availability, and counts the answers by status.
--   wrk -t2 -c256 -d15s -s loadtest/wrk/read.lua http://127.0.0.1:8080/v1/events/1
package.path = "loadtest/wrk/?.lua;" .. package.path
local tally = require("tally")

setup = tally.setup
init = tally.init
response = tally.response
done = tally.done
