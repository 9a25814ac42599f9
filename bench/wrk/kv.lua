-- wrk script for kvstore's v1 API: PUT or GET of random keys at Quorum,
-- named as kvctl bench names them (bench-0000000000 .. of KEYS, so that its
-- --prefill writes the same ones), counting every answer that is not 2xx
-- by status, with the first body of each (bench/errors.sh LOADGEN=wrk).
--   KEYS (10000), VALUE_SIZE (100), TOKEN, WRK_METHOD (GET or PUT)
--   WRK_API=classic: the original store's routes instead: GET /read/<key>,
--   and for PUT a create-only POST /write of a new key each time
--   (c-<thread>-<n>: /write refuses a key that exists)
local keys = tonumber(os.getenv("KEYS") or "10000")
local method = os.getenv("WRK_METHOD") or "GET"
local classic = os.getenv("WRK_API") == "classic"
local value = string.rep("x", tonumber(os.getenv("VALUE_SIZE") or "100"))
local headers = {
    ["Authorization"] = "Bearer " .. (os.getenv("TOKEN") or ""),
    ["X-Consistency"] = "quorum",
}
local threads = {}

function setup(thread)
    thread:set("id", #threads + 1)
    table.insert(threads, thread)
end

function init(args)
    -- each thread its own key sequence
    math.randomseed(os.time() * 100 + id)
    statuses = {}
    firsts = {}
end

local written = 0

function request()
    local key = string.format("bench-%010d", math.random(0, keys - 1))
    if classic then
        if method == "PUT" then
            written = written + 1
            local body = string.format('{"key":"c-%d-%d-%d","value":"%s"}', id, os.time(), written, value)
            return wrk.format("POST", "/write", headers, body)
        end
        return wrk.format("GET", "/read/" .. key, headers)
    end
    if method == "PUT" then
        return wrk.format("PUT", "/v1/kv/" .. key, headers, value)
    end
    return wrk.format("GET", "/v1/kv/" .. key, headers)
end

function response(status, hdrs, body)
    if status < 200 or status > 299 then
        local s = tostring(status)
        statuses[s] = (statuses[s] or 0) + 1
        if firsts[s] == nil then
            firsts[s] = body
        end
    end
end

function done(summary, latency, requests)
    local total, first = {}, {}
    for _, t in ipairs(threads) do
        for s, n in pairs(t:get("statuses")) do
            total[s] = (total[s] or 0) + n
        end
        for s, b in pairs(t:get("firsts")) do
            if first[s] == nil then
                first[s] = b
            end
        end
    end
    io.write(string.format("requests %d, socket errors connect %d read %d write %d timeout %d\n",
        summary.requests, summary.errors.connect, summary.errors.read,
        summary.errors.write, summary.errors.timeout))
    for s, n in pairs(total) do
        io.write(string.format("status %s: %d (first: %s)\n", s, n, first[s]))
    end
end
