-- submit.lua: admit one job in one step: idempotency, the queue's and the tenant's limits, the
-- record, its place in its tenant's line, and a dispatch if the window has room.
-- A = {id, tenant, model, class, units, images, created, fields, index, idem_key, idem_value, idem_ttl,
--      max_queue, limits = {rate, burst, max_queued, quota, quota_window}, deadline, d}
-- Returns {'created', id, position, units ahead} | {'duplicate', stored} | {'full'} |
--         {'limited', limit, retry after s, limit value, remaining}
if A.idem_key ~= '' then
  local seen = redis.call('GET', A.idem_key)
  if seen then return {'duplicate', seen} end
end
if num(redis.call('HGET', K.stats, 'queued'), 0) >= A.max_queue then return {'full'} end

local L, t, now = A.limits, A.tenant, A.d.now
local function limited(name, retry, limit, remaining)
  redis.call('HINCRBY', K.metrics, 'limited:' .. name, 1)
  return {'limited', name, fmt(math.max(retry, 0)), fmt(limit), fmt(math.max(remaining, 0))}
end

-- The submit rate: GCRA, a burst of L.burst then one every 1 / L.rate seconds.
local gcra_key, tat = 'dq:gcra:submit:' .. t, nil
if L.rate and L.rate > 0 then
  local interval = 1 / L.rate
  local tolerance = (L.burst - 1) * interval
  tat = math.max(num(redis.call('GET', gcra_key), now), now)
  if tat - now > tolerance then
    return limited('rate', tat - tolerance - now, L.burst, 0)
  end
  tat = tat + interval
end
local queued = num(redis.call('HGET', K.usage(t), 'queued'), 0)
if L.max_queued and queued >= L.max_queued then
  return limited('max_queued', 5, L.max_queued, 0)
end
-- Work units per rolling window, counted in two fixed windows (the previous one weighs less
-- as the current one goes on). A hash per tenant, a field per window: Redis 6.2 corrupts its
-- heap on a second INCRBYFLOAT of a string key inside a script like this one (seen here).
local qkey, window, used = 'dq:quota:' .. t, nil, 0
if L.quota and L.quota > 0 then
  local w = L.quota_window
  window = math.floor(now / w)
  local prev = num(redis.call('HGET', qkey, tostring(window - 1)), 0)
  local elapsed = (now - window * w) / w
  used = prev * (1 - elapsed) + num(redis.call('HGET', qkey, tostring(window)), 0)
  if used + A.units > L.quota then
    return limited('quota', (window + 1) * w - now, L.quota, L.quota - used)
  end
end

local jk = K.job(A.id)
redis.call('HSET', jk, unpack(A.fields))
redis.call('ZADD', A.index, A.created, A.id)
if tat then redis.call('SET', gcra_key, tat, 'PX', math.ceil((tat - now) * 1000) + 1000) end
if window then
  redis.call('HINCRBYFLOAT', qkey, tostring(window), A.units)
  redis.call('HDEL', qkey, tostring(window - 2))
  redis.call('EXPIRE', qkey, math.ceil(L.quota_window * 2) + 60)
end
if A.deadline then redis.call('ZADD', 'dq:deadlines', A.deadline, A.id) end
if A.idem_key ~= '' then redis.call('SET', A.idem_key, A.idem_value, 'EX', A.idem_ttl) end
local r = {id = A.id, status = 'queued', attempt = 0, worker = '', tenant = t, model = A.model,
           class = A.class, units = A.units, created = A.created, dispatched_at = '',
           images = A.images}
count(r, 'queued', 1)
redis.call('HINCRBY', K.stats, 'queued', 1)
enter_waiting(r, false)
dispatch(A.model)
r = read(A.id)
local jobs, units = ahead(r)
return {'created', A.id, tostring(jobs + 1), fmt(units)}
