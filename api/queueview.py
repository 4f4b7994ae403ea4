"""`GET /v1/queue`: depth per model, class and (for admins) tenant, workers, throughput, pools."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from api.deps import CallerDep
from api.openapi import errors
from api.resources import Resources
from core import heartbeats, keys

router = APIRouter()


class ScalerView(BaseModel):
    """The autoscaler's last decision."""

    current: int
    desired: int
    reason: str


class QueueStatus(BaseModel):
    """The queue as a whole."""

    queued: int
    running: int
    workers: int
    images_per_s: float | None
    eta_s: float | None
    scaler: ScalerView | None = None  # None while no scaler is deciding; every pool summed
    pools: dict[str, ScalerView] = {}  # each model's pool, as the scaler last decided
    by_priority: dict[str, int] = {}  # jobs waiting per class, all models
    by_model: dict[str, dict[str, int]] = {}  # per model: waiting per class, dispatched
    by_tenant: dict[str, int] | None = None  # jobs waiting per tenant (admin keys only)


@router.get(
    "/v1/queue",
    response_model=QueueStatus,
    tags=["queue"],
    summary="The queue: depth, workers, throughput",
    operation_id="queue_status",
    responses=errors(401, 429, 503),
)
async def queue(caller: CallerDep) -> QueueStatus:
    """Depth, running jobs, live workers, measured throughput and the wait for a new job."""
    res = caller.res
    queued, running = await res.jobs.counts()
    beats = await heartbeats.live_async(res.redis, res.settings.heartbeat_s * 3)
    rate = heartbeats.images_per_s(beats)
    eta = round((queued + 1) / rate, 2) if rate else None
    pools = await heartbeats.scaler_statuses_async(res.redis)
    decided = heartbeats.fleet_status(pools)
    scaler = ScalerView.model_validate(decided.model_dump()) if decided else None
    by_model, by_tenant = await depths(res, caller.admin)
    by_priority = {c: sum(m.get(c, 0) for m in by_model.values()) for c in keys.CLASSES}
    return QueueStatus(
        queued=queued,
        running=running,
        workers=len(beats),
        images_per_s=rate,
        eta_s=eta,
        scaler=scaler,
        by_priority=by_priority,
        by_model=by_model,
        by_tenant=by_tenant,
        pools={m: ScalerView.model_validate(d.model_dump()) for m, d in pools.items()},
    )


async def depths(
    res: Resources, admin: bool
) -> tuple[dict[str, dict[str, int]], dict[str, int] | None]:
    """Waiting jobs per model and class (and dispatched), and, for an admin, per tenant."""
    models = sorted(str(m) for m in await res.redis.smembers(keys.MODELS))  # type: ignore[misc]
    pipe = res.redis.pipeline(transaction=False)
    for model in models:
        for klass in keys.CLASSES:
            pipe.zcard(keys.waiting(model, klass))
            pipe.zrange(keys.lines(model, klass), 0, -1)
        pipe.zcard(keys.dispatched(model))
    replies = iter(await pipe.execute())
    by_model: dict[str, dict[str, int]] = {}
    tenants: set[tuple[str, str, str]] = set()
    for model in models:
        row = {}
        for klass in keys.CLASSES:
            row[klass] = int(next(replies))
            tenants.update((model, klass, str(t)) for t in next(replies))
        row["dispatched"] = int(next(replies))
        by_model[model] = row
    if not admin:
        return by_model, None
    pipe = res.redis.pipeline(transaction=False)
    for model, klass, tenant in sorted(tenants):
        pipe.zcard(keys.ready(model, klass, tenant))
    by_tenant: dict[str, int] = {}
    for (_, _, tenant), n in zip(sorted(tenants), await pipe.execute(), strict=True):
        by_tenant[tenant] = by_tenant.get(tenant, 0) + int(n)
    return by_model, by_tenant
