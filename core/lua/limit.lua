-- limit.lua: a GCRA rate limit on one key (stands alone, no ledger functions).
-- A = {key, rate (per second), burst, now}. Returns {1, "0"} when allowed (and counts it),
-- else {0, seconds to wait}.
local A = cjson.decode(ARGV[1])
local interval = 1 / A.rate
local tolerance = (A.burst - 1) * interval
local tat = math.max(tonumber(redis.call('GET', A.key)) or A.now, A.now)
if tat - A.now > tolerance then
  return {0, string.format('%.17g', tat - tolerance - A.now)}
end
tat = tat + interval
redis.call('SET', A.key, string.format('%.17g', tat), 'PX', math.ceil((tat - A.now) * 1000) + 1000)
return {1, '0'}
