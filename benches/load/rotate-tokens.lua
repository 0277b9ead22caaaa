-- wrk script: each request carries the next bearer token from a file, round robin, so a gateway's
-- verified-token cache sees each token many times within its lifetime but never one token only.
-- usage: wrk ... -s rotate-tokens.lua URL -- <token-file> <host-header>
-- The requests are built once in init(), so the load generator spends no time formatting them.
local requests = {}
local n = 0
local i = 0

function init(args)
  local host = args[2]
  for line in io.lines(args[1]) do
    if #line > 0 then
      n = n + 1
      requests[n] = wrk.format("GET", wrk.path, { ["Host"] = host, ["Authorization"] = "Bearer " .. line })
    end
  end
  if n == 0 then
    error("no tokens in " .. args[1])
  end
  -- threads start at different offsets
  i = math.random(n) - 1
end

function request()
  i = i + 1
  if i > n then
    i = 1
  end
  return requests[i]
end
