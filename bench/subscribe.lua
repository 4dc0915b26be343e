-- wrk script for P7: POST /subscribe with a new address on every request.
--   BENCH_PREFIX=r1 wrk -t1 -c32 -d10s --latency -s bench/subscribe.lua http://127.0.0.1:PORT/subscribe
-- Prints one line "JSON {...}" with the totals and latency percentiles (ms).
local prefix = os.getenv("BENCH_PREFIX") or "w"
local counter = 0
local next_id = 0

function setup(thread)
  next_id = next_id + 1
  thread:set("tid", next_id)
end

local headers = { ["Content-Type"] = "application/x-www-form-urlencoded" }

request = function()
  counter = counter + 1
  local body = "email=" .. prefix .. "-" .. tostring(tid) .. "-" .. counter
    .. "%40example.com&name=Bench+Reader"
  return wrk.format("POST", nil, headers, body)
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'JSON {"requests": %d, "duration_s": %.6f, "errors": %d, "non2xx": %d, '
      .. '"p50_ms": %.3f, "p90_ms": %.3f, "p99_ms": %.3f, "max_ms": %.3f}\n',
    summary.requests, summary.duration / 1e6, e.connect + e.read + e.write + e.timeout,
    e.status, latency:percentile(50) / 1000, latency:percentile(90) / 1000,
    latency:percentile(99) / 1000, latency.max / 1000))
end
