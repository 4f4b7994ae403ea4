"""What an admin key may do beyond its own jobs: see the whole queue, cancel a tenant's queued
jobs, pause and resume dispatch. A user key gets 403 here (and 404 for other tenants' jobs
everywhere else)."""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel

from api.deps import AdminDep
from api.openapi import errors
from core import keys, scripts
from core.store import Change

router = APIRouter(prefix="/v1/admin", tags=["admin"])

BUCKET_SAMPLE = 500  # waiting jobs read per model and class to count buckets


class TenantLine(BaseModel):
    """A tenant's waiting work in one class of one model."""

    tenant: str
    waiting: int
    units: float
    inflight: int  # the tenant's jobs dispatched or running, all models
    virtual_start: float  # where weighted fair dispatch has it


class ClassQueue(BaseModel):
    """One priority class of one model."""

    waiting: int
    units: float
    oldest_wait_s: float | None
    tenants: list[TenantLine]
    buckets: dict[str, int]  # "WxH/steps/guidance" -> waiting jobs, from a sample of the oldest


class ModelQueue(BaseModel):
    """One model's queue."""

    paused: bool
    dispatched: int
    running_images: int
    classes: dict[str, ClassQueue]


class AdminQueue(BaseModel):
    """The whole queue."""

    paused: bool
    models: dict[str, ModelQueue]


class Canceled(BaseModel):
    """How many jobs a bulk cancel ended."""

    canceled: int


class Dispatch(BaseModel):
    """Whether dispatch runs, for each model ('*': all)."""

    paused: list[str]


def _texts(values: Any) -> list[str]:
    """Redis replies as text (the gateway's client decodes them already)."""
    return [str(v) for v in values]


@router.get(
    "/queue",
    response_model=AdminQueue,
    summary="The whole queue, by model, class, tenant and bucket",
    operation_id="admin_queue",
    responses=errors(401, 403, 429, 503),
)
async def queue(caller: AdminDep) -> AdminQueue:
    """Every model's queue by class, tenant and bucket; dispatched and running work."""
    redis = caller.res.redis
    models = sorted(_texts(await redis.smembers(keys.MODELS)))  # type: ignore[misc]
    paused = set(_texts(await redis.hkeys(keys.PAUSED)))  # type: ignore[misc]
    stats = await redis.hgetall(keys.STATS)  # type: ignore[misc]
    found = {}
    for model in models:
        classes = {c: await _class_queue(redis, model, c) for c in keys.CLASSES}
        found[model] = ModelQueue(
            paused=model in paused or "*" in paused,
            dispatched=await redis.zcard(keys.dispatched(model)),
            running_images=int(stats.get(f"rimages:{model}", 0)),
            classes=classes,
        )
    return AdminQueue(paused="*" in paused, models=found)


async def _class_queue(redis: Any, model: str, klass: str) -> ClassQueue:
    now = time.time()
    oldest = await redis.zrange(keys.waiting(model, klass), 0, 0, withscores=True)
    units = await redis.hgetall(keys.queued_units(model, klass))
    lines = await redis.zrange(keys.lines(model, klass), 0, -1, withscores=True)
    tenants = []
    for tenant, start in lines:
        tenants.append(
            TenantLine(
                tenant=tenant,
                waiting=await redis.zcard(keys.ready(model, klass, tenant)),
                units=round(float(units.get(tenant, 0)), 6),
                inflight=int(await redis.hget(keys.usage(tenant), "inflight") or 0),
                virtual_start=float(start),
            )
        )
    return ClassQueue(
        waiting=await redis.zcard(keys.waiting(model, klass)),
        units=round(float(units.get("*", 0)), 6),
        oldest_wait_s=round(now - float(oldest[0][1]), 3) if oldest else None,
        tenants=tenants,
        buckets=await _buckets(redis, model, klass),
    )


async def _buckets(redis: Any, model: str, klass: str) -> dict[str, int]:
    """Waiting jobs per bucket, counted over the oldest BUCKET_SAMPLE."""
    ids = await redis.zrange(keys.waiting(model, klass), 0, BUCKET_SAMPLE - 1)
    pipe = redis.pipeline(transaction=False)
    for job_id in ids:
        pipe.hget(keys.job(job_id), "request")
    counts: dict[str, int] = {}
    for raw in await pipe.execute():
        try:
            r = json.loads(raw)
            name = f"{r['width']}x{r['height']}/{r['steps']}/{r['guidance_scale']:g}"
        except (TypeError, ValueError, KeyError):
            name = "unreadable"
        counts[name] = counts.get(name, 0) + 1
    return counts


@router.post(
    "/tenants/{tenant}/cancel",
    response_model=Canceled,
    summary="Cancel a tenant's queued jobs",
    operation_id="admin_cancel_tenant",
    responses=errors(401, 403, 422, 429, 503),
)
async def cancel_tenant(tenant: str, caller: AdminDep) -> Canceled:
    """Cancel every queued job of a tenant (waiting or dispatched; running ones run on)."""
    res = caller.res
    redis = res.redis
    ids: list[str] = []
    for model in _texts(await redis.smembers(keys.MODELS)):  # type: ignore[misc]
        for klass in keys.CLASSES:
            ids += _texts(await redis.zrange(keys.ready(model, klass, tenant), 0, -1))
        for job_id in _texts(await redis.zrange(keys.dispatched(model), 0, -1)):
            if await redis.hget(keys.job(job_id), "tenant") == tenant:  # type: ignore[misc]
                ids.append(job_id)
    canceled = 0
    done = {"finished_at": time.time()}
    for job_id in ids:
        applied = await res.jobs.change(Change("cancel", job_id, fields=done))
        canceled += applied.ok
    return Canceled(canceled=canceled)


@router.post(
    "/dispatch/pause",
    response_model=Dispatch,
    summary="Stop dispatching jobs",
    operation_id="admin_pause",
    responses=errors(401, 403, 422, 429, 503),
)
async def pause(caller: AdminDep, model: str = "*") -> Dispatch:
    """Stop dispatching jobs (of one model, or all): queued jobs wait, running ones finish."""
    redis = caller.res.redis
    await redis.hset(keys.PAUSED, model, time.time())  # type: ignore[misc]
    return Dispatch(paused=sorted(_texts(await redis.hkeys(keys.PAUSED))))  # type: ignore[misc]


@router.post(
    "/dispatch/resume",
    response_model=Dispatch,
    summary="Dispatch again",
    operation_id="admin_resume",
    responses=errors(401, 403, 422, 429, 503),
)
async def resume(caller: AdminDep, model: str = "*") -> Dispatch:
    """Dispatch again (one model, or all), at once."""
    res = caller.res
    redis = res.redis
    await redis.hdel(keys.PAUSED, model)  # type: ignore[misc]
    dispatch = redis.register_script(scripts.source("dispatch"))
    table = res.jobs.ledger.dispatch.table(time.time())
    for name in _texts(await redis.smembers(keys.MODELS)):  # type: ignore[misc]
        await dispatch([], [json.dumps({"model": name, "d": table})])
    return Dispatch(paused=sorted(_texts(await redis.hkeys(keys.PAUSED))))  # type: ignore[misc]
