-- wrk script: cycle through request paths (and bodies, paired by index); report JSON.
-- usage: wrk -s bench/wrk_cycle.lua URL -- PATHS_FILE [BODIES_FILE] [METHOD]
local paths, bodies = {}, {}
local counter = 0

function init(args)
  for line in io.lines(args[1]) do paths[#paths + 1] = line end
  if args[2] and args[2] ~= "" then
    for line in io.lines(args[2]) do bodies[#bodies + 1] = line end
  end
  if args[3] then wrk.method = args[3] end
  counter = math.random(0, #paths - 1)
end

function request()
  counter = counter + 1
  local i = (counter % #paths) + 1
  local body = nil
  if #bodies > 0 then body = bodies[i] end
  return wrk.format(nil, paths[i], nil, body)
end

function done(summary, latency, requests)
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.status + summary.errors.timeout
  io.write(string.format(
    '{"count": %d, "errors": %d, "wall_s": %f, "p50_ms": %f, "p90_ms": %f, "p99_ms": %f, "max_ms": %f}\n',
    summary.requests, errors, summary.duration / 1e6, latency:percentile(50) / 1000,
    latency:percentile(90) / 1000, latency:percentile(99) / 1000, latency.max / 1000))
end
