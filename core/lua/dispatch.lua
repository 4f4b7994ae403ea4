-- dispatch.lua: fill one model's window now (a worker came up, an admin resumed dispatch).
-- A = {model, d}
return dispatch(A.model)
