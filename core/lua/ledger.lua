-- ledger.lua: what every ledger script shares. Prepended to each script by core/scripts.py.
--
-- Every script takes one argument, ARGV[1]: a JSON table with named fields (see the Python that
-- builds it in core/store.py). `A.d` is the dispatch configuration every script that may
-- dispatch carries: {now, margin, ttl, fifo, low_age, weight, max_running, queue, template,
-- max_per_call}. Numbers go back to Python as strings (Redis would truncate a Lua float).
local A = cjson.decode(ARGV[1])
local D = A.d or {}
local CLASSES = {'high', 'normal', 'low'}
local FRONT = 1e10  -- a handed-back job's order: ahead of every job of its line

local function num(v, default) return tonumber(v) or default end
local function fmt(x) return string.format('%.17g', x) end

local K = {}
function K.job(id) return 'dq:job:' .. id end
function K.ready(m, c, t) return 'dq:ready:' .. m .. ':' .. c .. ':' .. t end
function K.lines(m, c) return 'dq:lines:' .. m .. ':' .. c end
function K.finish(m, c) return 'dq:finish:' .. m .. ':' .. c end
function K.vclock(m, c) return 'dq:vclock:' .. m .. ':' .. c end
function K.waiting(m, c) return 'dq:waiting:' .. m .. ':' .. c end
function K.units(m, c) return 'dq:units:' .. m .. ':' .. c end
function K.dispatched(m) return 'dq:dispatched:' .. m end
function K.pool(m) return 'dq:pool:' .. m end
function K.model(m) return 'dq:model:' .. m end
function K.tenant(t) return 'dq:tenant:' .. t end
function K.usage(t) return 'dq:usage:' .. t end
K.running = 'dq:running'
K.stats = 'dq:stats'
K.metrics = 'dq:metrics'

local FIELDS = {'status', 'attempt', 'worker', 'tenant', 'model', 'priority', 'units',
                'created_at', 'dispatched_at', 'images'}

-- A job as the scripts see it; `place` is where it sits: W(aiting), D(ispatched), R(unning), T.
local function read(id)
  local v = redis.call('HMGET', K.job(id), unpack(FIELDS))
  if not v[1] then return nil end
  local r = {id = id, status = v[1], attempt = num(v[2], 0), worker = v[3] or '',
             tenant = v[4] or '', model = v[5] or '', class = v[6] or 'normal',
             units = num(v[7], 0), created = num(v[8], 0), dispatched_at = v[9] or '',
             images = num(v[10], 1)}
  if r.status == 'queued' then
    if r.dispatched_at ~= '' then r.place = 'D' else r.place = 'W' end
  elseif r.status == 'running' then r.place = 'R'
  else r.place = 'T' end
  return r
end

local function conf(t, field, default)
  return num(redis.call('HGET', K.tenant(t), field), default)
end

local function count(r, field, n) redis.call('HINCRBY', K.usage(r.tenant), field, n) end
-- The model's totals in dq:stats: dunits/runits (work units dispatched/running) and images
-- waiting per class (wimages:<model>:<class>), dispatched (dimages) and running (rimages), and
-- the jobs running (rjobs).
local function add_units(r, where, sign)
  redis.call('HINCRBYFLOAT', K.stats, where .. ':' .. r.model, sign * r.units)
  local images = 'dimages:' .. r.model
  if where == 'runits' then
    images = 'rimages:' .. r.model
    redis.call('HINCRBY', K.stats, 'rjobs:' .. r.model, sign)
  end
  redis.call('HINCRBY', K.stats, images, sign * r.images)
end
local function add_waiting(r, sign)
  redis.call('HINCRBY', K.stats, 'wimages:' .. r.model .. ':' .. r.class, sign * r.images)
end

-- What a job's end adds to dq:metrics (core/metrics.py reads it): its outcome by error code
-- (A.code), the work served to its tenant, and its times from the record, bucketed by the bounds
-- A.le (queue and run for a job that started, end to end for one that succeeded), with the
-- times only the caller knows (A.obs: {{name, seconds}, ...}).
local function observe(name, m, value)
  value = math.max(value, 0)  -- the gateway's and the worker's clocks may differ a little
  local le = '+Inf'
  for _, b in ipairs(A.le or {}) do
    if value <= tonumber(b) then le = b break end
  end
  redis.call('HINCRBY', K.metrics, 'h:' .. name .. ':' .. m .. ':' .. le, 1)
  redis.call('HINCRBYFLOAT', K.metrics, 'hs:' .. name .. ':' .. m, value)
end

local function serve(r)
  local field = 'served:' .. r.tenant
  if redis.call('HEXISTS', K.metrics, field) == 0 then
    if num(redis.call('HGET', K.metrics, 'served#'), 0) >= (A.max_tenants or 50) then
      field = 'served:_other'
    else
      redis.call('HINCRBY', K.metrics, 'served#', 1)
    end
  end
  redis.call('HINCRBYFLOAT', K.metrics, field, r.units)
end

local function count_end(r, to)
  local m = r.model
  redis.call('HINCRBY', K.metrics, 'finished:' .. m .. ':' .. to .. ':' .. (A.code or ''), 1)
  local t = redis.call('HMGET', K.job(r.id), 'started_at', 'finished_at')
  local started, finished = tonumber(t[1]), tonumber(t[2]) or A.now
  if started then
    observe('queue', m, started - r.created)
    observe('run', m, finished - started)
  end
  if to == 'succeeded' then
    observe('e2e', m, finished - r.created)
    serve(r)
  end
  for _, o in ipairs(A.obs or {}) do observe(o[1], m, o[2]) end
end

-- Into a tenant's line: at its arrival order, or at the front when handed back.
local function enter_waiting(r, front)
  local m, c, t = r.model, r.class, r.tenant
  local order = r.created
  if front then order = r.created - FRONT end
  redis.call('ZADD', K.ready(m, c, t), order, r.id)
  redis.call('ZADD', K.waiting(m, c), r.created, r.id)
  redis.call('HINCRBYFLOAT', K.units(m, c), t, r.units)
  redis.call('HINCRBYFLOAT', K.units(m, c), '*', r.units)
  add_waiting(r, 1)
  redis.call('SADD', 'dq:models', m)
  if not redis.call('ZSCORE', K.lines(m, c), t) then
    -- A tenant that comes back starts at the class's virtual clock (or its own last finish).
    local v = num(redis.call('GET', K.vclock(m, c)), 0)
    local f = num(redis.call('HGET', K.finish(m, c), t), 0)
    redis.call('ZADD', K.lines(m, c), math.max(v, f), t)
  end
  r.place = 'W'
end

local function leave_waiting(r)
  local m, c, t = r.model, r.class, r.tenant
  redis.call('ZREM', K.ready(m, c, t), r.id)
  redis.call('ZREM', K.waiting(m, c), r.id)
  redis.call('HINCRBYFLOAT', K.units(m, c), t, -r.units)
  redis.call('HINCRBYFLOAT', K.units(m, c), '*', -r.units)
  add_waiting(r, -1)
  if redis.call('ZCARD', K.ready(m, c, t)) == 0 then redis.call('ZREM', K.lines(m, c), t) end
end

-- Out of whatever place holds the job (the status counters are the caller's).
local function vacate(r)
  if r.place == 'W' then leave_waiting(r)
  elseif r.place == 'D' then
    redis.call('ZREM', K.dispatched(r.model), r.id)
    redis.call('HSET', K.job(r.id), 'dispatched_at', '')
    count(r, 'inflight', -1)
    add_units(r, 'dunits', -1)
  elseif r.place == 'R' then
    redis.call('ZREM', K.running, r.id)
    count(r, 'inflight', -1)
    add_units(r, 'runits', -1)
  end
  if r.status == 'queued' then
    count(r, 'queued', -1)
    redis.call('HINCRBY', K.stats, 'queued', -1)
  end
end

local function paused(m)
  return redis.call('HEXISTS', 'dq:paused', m) == 1 or redis.call('HEXISTS', 'dq:paused', '*') == 1
end

-- The model's window: the next batch of each live worker (the one it forms while one runs),
-- plus a margin for workers on their way. More would wait in the broker, ahead of later arrivals.
local function window(m)
  local live = redis.call('ZCOUNT', K.pool(m), D.now - D.ttl, '+inf')
  local prefetch = num(redis.call('HGET', K.model(m), 'prefetch'), 0)
  return D.margin + live * prefetch
end

local function under_cap(t)
  return num(redis.call('HGET', K.usage(t), 'inflight'), 0) < conf(t, 'max_running', D.max_running)
end

local function head(m, c, t) return redis.call('ZRANGE', K.ready(m, c, t), 0, 0)[1] end

local function oldest(m, c)
  local o = redis.call('ZRANGE', K.waiting(m, c), 0, 0, 'WITHSCORES')
  if o[1] then return o[1], tonumber(o[2]) end
  return nil, nil
end

local function tenant_of(id) return redis.call('HGET', K.job(id), 'tenant') end

-- Which job goes next: FIFO (the comparison mode) takes the oldest of all; fair dispatch takes
-- an overdue `low` job first (its aging bound), then strict priority, and within a class the
-- tenant with the smallest virtual start that is under its running cap, its line's head.
local function pick(m)
  if D.fifo then
    local best, best_at, best_c = nil, nil, nil
    for _, c in ipairs(CLASSES) do
      local j, at = oldest(m, c)
      if j and (not best_at or at < best_at) then best, best_at, best_c = j, at, c end
    end
    if best then return best_c, tenant_of(best), best end
    return nil
  end
  local j, at = oldest(m, 'low')
  if j and D.now - at >= D.low_age then
    local t = tenant_of(j)
    if under_cap(t) then return 'low', t, head(m, 'low', t) end
  end
  for _, c in ipairs(CLASSES) do
    for _, t in ipairs(redis.call('ZRANGE', K.lines(m, c), 0, -1)) do
      if under_cap(t) then return c, t, head(m, c, t) end
    end
  end
  return nil
end

local function render(id, m, n)
  local tag = id .. '.' .. n
  return (string.gsub(string.gsub(string.gsub(D.template, '@JOB@', id), '@TAG@', tag),
                      '@QUEUE@', D.queue .. '.' .. m))
end

local function dispatch_one(m, c, t, id)
  local r = read(id)
  -- Weighted fair queuing: the tenant's next job starts where this one finishes, in virtual time.
  local s = num(redis.call('ZSCORE', K.lines(m, c), t), 0)
  local f = s + math.max(r.units, 1e-9) / conf(t, 'weight', D.weight)
  local v = num(redis.call('GET', K.vclock(m, c)), 0)
  redis.call('SET', K.vclock(m, c), math.max(v, s))
  redis.call('HSET', K.finish(m, c), t, f)
  leave_waiting(r)
  if redis.call('ZCARD', K.ready(m, c, t)) > 0 then redis.call('ZADD', K.lines(m, c), f, t) end
  local n = redis.call('INCR', 'dq:seq')
  redis.call('LPUSH', D.queue .. '.' .. m, render(id, m, n))
  redis.call('ZADD', K.dispatched(m), D.now, id)
  redis.call('HSET', K.job(id), 'dispatched_at', D.now)
  count(r, 'inflight', 1)
  add_units(r, 'dunits', 1)
  redis.call('HINCRBY', K.metrics, 'dispatches:' .. m .. ':' .. c, 1)
end

-- Fill the model's window from its lines; how many jobs went out.
local function dispatch(m)
  if m == '' or paused(m) then return 0 end
  local room = window(m) - redis.call('ZCARD', K.dispatched(m))
  local sent = 0
  while room > 0 and sent < D.max_per_call do
    local c, t, id = pick(m)
    if not id then break end
    dispatch_one(m, c, t, id)
    room, sent = room - 1, sent + 1
  end
  return sent
end

-- How far a waiting job is from running: (jobs ahead, work units ahead). Exact for FIFO; for
-- fair dispatch an estimate from virtual time: another tenant goes ahead by the work it may
-- do, at its weight, before this job's virtual start. The work ahead includes half of what
-- runs now (what remains of it, on average), though no running job counts in the position.
local function ahead(r)
  local m, c, t = r.model, r.class, r.tenant
  local running = num(redis.call('HGET', K.stats, 'runits:' .. m), 0) / 2
  if r.place == 'D' then
    local rank = redis.call('ZRANK', K.dispatched(m), r.id) or 0
    return rank, running + rank * r.units
  end
  local jobs = redis.call('ZCARD', K.dispatched(m))
  local units = running + num(redis.call('HGET', K.stats, 'dunits:' .. m), 0)
  if D.fifo then
    for _, c2 in ipairs(CLASSES) do
      local n = redis.call('ZCOUNT', K.waiting(m, c2), '-inf', '(' .. fmt(r.created))
      jobs = jobs + n
      units = units + n * r.units
    end
    return jobs, units
  end
  for _, c2 in ipairs(CLASSES) do
    if c2 == c then break end
    jobs = jobs + redis.call('ZCARD', K.waiting(m, c2))
    units = units + num(redis.call('HGET', K.units(m, c2), '*'), 0)
  end
  local k = redis.call('ZRANK', K.ready(m, c, t), r.id) or 0
  local depth = math.max(1, redis.call('ZCARD', K.ready(m, c, t)))
  local mine = num(redis.call('HGET', K.units(m, c), t), 0) / depth * k
  local start = num(redis.call('ZSCORE', K.lines(m, c), t), 0) + mine / conf(t, 'weight', D.weight)
  jobs, units = jobs + k, units + mine
  local others = redis.call('ZRANGE', K.lines(m, c), 0, -1, 'WITHSCORES')
  for i = 1, #others, 2 do
    local u = others[i]
    if u ~= t then
      local queued = num(redis.call('HGET', K.units(m, c), u), 0)
      local share = (start - tonumber(others[i + 1])) * conf(u, 'weight', D.weight)
      share = math.min(math.max(share, 0), queued)
      if queued > 0 then
        jobs = jobs + math.floor(share / queued * redis.call('ZCARD', K.ready(m, c, u)) + 0.5)
      end
      units = units + share
    end
  end
  return jobs, units
end
