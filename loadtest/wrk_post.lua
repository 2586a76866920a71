-- wrk script: POST one of many bodies (one JSON document per line of the file named by the
-- first script argument), chosen at random for each request, with the headers in WRK_HEADERS
-- ("Name: value|Name: value").
local bodies = {}

function init(args)
  for line in io.lines(args[1]) do
    bodies[#bodies + 1] = line
  end
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  for header in string.gmatch(os.getenv("WRK_HEADERS") or "", "[^|]+") do
    local name, value = string.match(header, "^([^:]+):%s*(.*)$")
    wrk.headers[name] = value
  end
end

function request()
  return wrk.format(nil, nil, nil, bodies[math.random(#bodies)])
end
