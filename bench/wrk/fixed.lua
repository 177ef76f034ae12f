-- Run 1: the same signed WAHA delivery on every request (a static request: wrk builds it once).
--   wrk ... -s bench/wrk/fixed.lua URL -- REQUESTS_FILE
-- REQUESTS_FILE: lines "hmac<TAB>request-id<TAB>timestamp-ms<TAB>json-body"; only the first line is used.

local function split(line)
   local fields = {}
   for field in (line .. "\t"):gmatch("([^\t]*)\t") do fields[#fields + 1] = field end
   return fields
end

function init(args)
   local file = assert(io.open(args[1], "r"), "cannot open " .. tostring(args[1]))
   local f = split(file:read("*l"))
   file:close()
   wrk.method = "POST"
   wrk.body = f[4]
   wrk.headers["Content-Type"] = "application/json"
   wrk.headers["X-Webhook-Hmac"] = f[1]
   wrk.headers["X-Webhook-Hmac-Algorithm"] = "sha512"
   wrk.headers["X-Webhook-Request-Id"] = f[2]
   wrk.headers["X-Webhook-Timestamp"] = f[3]
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'WRK_JSON {"duration_us":%d,"requests":%d,"bytes":%d,"connect_errors":%d,"read_errors":%d,' ..
      '"write_errors":%d,"status_errors":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
      '"max_us":%d,"mean_us":%.1f}\n',
      summary.duration, summary.requests, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
