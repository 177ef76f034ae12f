-- Runs 2 and 3 (and the seed baseline): every pre-signed WAHA delivery is sent exactly once.
--   wrk -t T ... -s bench/wrk/once.lua URL -- REQUESTS_FILE T MARKER_DIR [park|poll]
-- REQUESTS_FILE: lines "hmac<TAB>request-id<TAB>timestamp-ms<TAB>json-body" (signed in Python: LuaJIT has
-- no HMAC). Thread k (1..T) sends lines k, k+T, k+2T, ... so deliveries leave roughly in file order.
-- When a thread has handed out its last line it writes MARKER_DIR/thread-k.sent; once every answer is in it
-- writes MARKER_DIR/thread-k.json with its counts. The bench stops wrk with SIGINT when every thread is done.
-- Connections left without work:
--   park (default): wait (delay() returns an hour) and the thread stops its loop once done. Right for
--                   gthread servers, which watch idle keep-alive connections without tying up a thread.
--   poll:           keep sending GET /health. A sync worker that accepts an idle connection blocks on it
--                   until its timeout (wrk reconnects after every "Connection: close"), so idle connections
--                   would stall a sync server; health checks are answered in about a millisecond.

local threads = {}
local counter = 0

function setup(thread)
   counter = counter + 1
   thread:set("id", counter)
   threads[counter] = thread
end

local function split(line)
   local fields = {}
   for field in (line .. "\t"):gmatch("([^\t]*)\t") do fields[#fields + 1] = field end
   return fields
end

local function touch(path, text)
   local file = io.open(path, "w")
   if file then
      file:write(text)
      file:close()
   end
end

local queue = {}
local next_item = 1
local verifying = false
local marker_written = false
local marker_path
local sent_path
local parked = nil
local mode = "park"

-- globals: read by done() through thread:get()
sent, extra, answered, s200, s202, sother, health = 0, 0, 0, 0, 0, 0, 0

function init(args)
   local path, nthreads, marker_dir = args[1], tonumber(args[2]), args[3]
   mode = args[4] or "park"
   local id = wrk.thread:get("id")
   marker_path = marker_dir .. "/thread-" .. id .. ".json"
   sent_path = marker_dir .. "/thread-" .. id .. ".sent"
   local index = 0
   for line in io.lines(path) do
      index = index + 1
      if (index - 1) % nthreads == id - 1 then
         local f = split(line)
         queue[#queue + 1] = wrk.format("POST", wrk.path, {
            ["Content-Type"] = "application/json",
            ["X-Webhook-Hmac"] = f[1],
            ["X-Webhook-Hmac-Algorithm"] = "sha512",
            ["X-Webhook-Request-Id"] = f[2],
            ["X-Webhook-Timestamp"] = f[3],
         }, f[4])
      end
   end
   -- Sent when a connection asks for work after the share is used up (more connections than items).
   parked = wrk.format("GET", "/health")
   -- wrk calls request() once on the first thread to check the script; that call must not use up an item.
   verifying = (id == 1)
   if #queue == 0 then touch(sent_path, "0\n") end
end

local function finish_if_done()
   if not marker_written and next_item > #queue and answered >= sent then
      marker_written = true
      touch(marker_path, string.format('{"sent":%d,"extra":%d,"answered":%d,"s200":%d,"s202":%d,"other":%d}\n',
                                       sent, extra, answered, s200, s202, sother))
      if mode == "park" then
         wrk.thread:stop()  -- nothing left to do; parked connections must not count keep-alive closes as errors
      end
   end
end

function delay()
   if next_item > #queue and mode == "park" then
      return 3600000  -- share used up: park this connection until wrk is stopped
   end
   return 0
end

function request()
   if verifying then
      verifying = false
      return queue[1] or parked
   end
   if next_item > #queue then
      extra = extra + 1
      return parked
   end
   local req = queue[next_item]
   next_item = next_item + 1
   sent = sent + 1
   if next_item > #queue then
      touch(sent_path, tostring(sent) .. "\n")  -- the bench notes when every thread has sent its share
   end
   return req
end

function response(status, headers, body)
   if body and body:find('"healthy"', 1, true) then  -- the answer to a GET /health filler, not a delivery
      health = health + 1
      return
   end
   answered = answered + 1
   if status == 200 then s200 = s200 + 1 elseif status == 202 then s202 = s202 + 1 else sother = sother + 1 end
   finish_if_done()
end

function done(summary, latency, requests)
   local per_thread = {}
   for i, t in ipairs(threads) do
      per_thread[#per_thread + 1] = string.format(
         '{"id":%d,"sent":%d,"extra":%d,"answered":%d,"s200":%d,"s202":%d,"other":%d}',
         i, t:get("sent"), t:get("extra"), t:get("answered"), t:get("s200"), t:get("s202"), t:get("sother"))
   end
   local e = summary.errors
   io.write(string.format(
      'WRK_JSON {"duration_us":%d,"requests":%d,"bytes":%d,"connect_errors":%d,"read_errors":%d,' ..
      '"write_errors":%d,"status_errors":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
      '"max_us":%d,"mean_us":%.1f,"threads":[%s]}\n',
      summary.duration, summary.requests, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean,
      table.concat(per_thread, ",")))
end
