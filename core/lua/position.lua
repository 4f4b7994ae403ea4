-- position.lua: where a queued job stands: {place, jobs ahead, work units ahead}; {} if not queued.
-- A = {id, d}
local r = read(A.id)
if not r or r.status ~= 'queued' then return {} end
local jobs, units = ahead(r)
return {r.place, tostring(jobs), fmt(units)}
