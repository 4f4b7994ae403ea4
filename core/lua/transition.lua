-- transition.lua: one status change of one job, compared before it is written.
-- A = {op, id, now, attempt, worker, lease, cutoff, to, fields, ttl, enter, stay,
--      progress_every, webhook_queue, incr, d}
--   op: claim (dispatched -> running, attempt + 1, by A.worker), renew (running, same attempt
--   and worker), finish (running -> A.to, same attempt and worker), handback (running or
--   dispatched -> the front of its line; the reaper), undispatch (dispatched only -> the front
--   of its line; a drain's buffer, a lost message), cancel, fail (any live place).
--   cutoff: refuse unless the lease (running) or the dispatch (dispatched) ended by then.
--   enter/stay: the webhook event {type, order, message} of entering the status or staying in it.
--   incr: {{field, n}, ...} added to dq:metrics once, only if the change applies.
--   code, le, obs, max_tenants: what an end counts (ledger.lua count_end; core/metrics.py).
-- Returns {outcome ('ok', 'refused', 'missing'), status before, attempt after}.
local r = read(A.id)
if not r then return {'missing', '', ''} end

local function refuse() return {'refused', r.status, tostring(r.attempt)} end
local function same_attempt() return A.attempt == nil or r.attempt == A.attempt end
local function same_worker() return A.worker == nil or r.worker == A.worker end
local function ended_by_cutoff()
  if A.cutoff == nil then return true end
  if r.place == 'R' then return num(redis.call('ZSCORE', K.running, r.id), 0) <= A.cutoff end
  return num(redis.call('ZSCORE', K.dispatched(r.model), r.id), 0) <= A.cutoff
end

local op, to = A.op, nil
if op == 'claim' then
  if r.place ~= 'D' then return refuse() end
  -- Past its deadline a job never starts (the sweep fails it).
  local deadline = num(redis.call('HGET', K.job(r.id), 'deadline_at'), nil)
  if deadline and A.now > deadline then return refuse() end
  to = 'running'
elseif op == 'renew' then
  if r.place ~= 'R' or r.attempt ~= A.attempt or r.worker ~= A.worker then return refuse() end
  to = 'running'
elseif op == 'finish' then
  if r.place ~= 'R' or r.attempt ~= A.attempt or r.worker ~= A.worker then return refuse() end
  to = A.to
elseif op == 'handback' then
  if (r.place ~= 'R' and r.place ~= 'D') or not same_attempt() then return refuse() end
  if not same_worker() or not ended_by_cutoff() then return refuse() end
  to = 'queued'
elseif op == 'undispatch' then  -- a dispatched job only: a drain's buffer, a lost message
  if r.place ~= 'D' or not ended_by_cutoff() then return refuse() end
  to = 'queued'
elseif op == 'cancel' or op == 'fail' then
  if r.place == 'T' or not same_attempt() or not ended_by_cutoff() then return refuse() end
  if op == 'cancel' then to = 'canceled' else to = 'failed' end
else
  return redis.error_reply('unknown op ' .. tostring(op))
end

local attempt = r.attempt
local before = r.status
local ended = false
local jk = K.job(r.id)
if op == 'claim' then
  vacate(r)
  attempt = r.attempt + 1
  redis.call('HSET', jk, 'status', 'running', 'attempt', attempt, 'worker', A.worker)
  redis.call('ZADD', K.running, A.lease, r.id)
  count(r, 'inflight', 1)
  add_units(r, 'runits', 1)
elseif op == 'renew' then
  redis.call('ZADD', K.running, A.lease, r.id)
elseif op == 'handback' or op == 'undispatch' then
  vacate(r)
  redis.call('HSET', jk, 'status', 'queued')
  count(r, 'queued', 1)
  redis.call('HINCRBY', K.stats, 'queued', 1)
  r.status = 'queued'
  enter_waiting(r, true)
else  -- a terminal status
  ended = true
  vacate(r)
  -- Kept for the tenant's retention, at most the deployment's.
  local ttl = math.min(A.ttl, conf(r.tenant, 'retention_s', A.ttl))
  redis.call('HSET', jk, 'status', to, 'expires_at', A.now + ttl)
  redis.call('ZADD', 'dq:expiring', A.now + ttl, r.tenant .. ' ' .. r.id)
  redis.call('ZREM', 'dq:deadlines', r.id)
  redis.call('EXPIRE', jk, math.ceil(ttl))
end
if A.fields and #A.fields > 0 then redis.call('HSET', jk, unpack(A.fields)) end
if ended then count_end(r, to) end  -- after the fields: the record's own times
for _, pair in ipairs(A.incr or {}) do
  redis.call('HINCRBYFLOAT', K.metrics, pair[1], pair[2])
end

-- The webhook event of this change, created in this same step: once per (job, event type) by an
-- HSETNX marker; progress events instead at most once per interval.
local event = A.enter
if before == to then event = A.stay end
local subs = redis.call('HGET', jk, 'webhook_events')
if event and subs and string.find(' ' .. subs .. ' ', ' ' .. event.type .. ' ', 1, true) then
  local fresh
  if event.type == 'job.progress' then
    local last = num(redis.call('HGET', jk, 'webhook_progress_at'), 0)
    fresh = A.now - last >= A.progress_every
    if fresh then redis.call('HSET', jk, 'webhook_progress_at', A.now) end
  else
    fresh = redis.call('HSETNX', jk, 'webhook_event:' .. event.type, A.now) == 1
  end
  if fresh then
    redis.call('HSET', jk, 'webhook_last', event.order)
    redis.call('LPUSH', A.webhook_queue, event.message)
  end
end
redis.call('PUBLISH', 'dq:changes', r.id .. ' ' .. to)
-- A claim frees a place in the window, an end may free a tenant's running cap, a handback
-- brings a job back: each is a moment to dispatch.
if op ~= 'renew' and D.now then dispatch(r.model) end
return {'ok', before, tostring(attempt)}
