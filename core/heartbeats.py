"""What each worker says about itself every few seconds, for the gateway's ETA and the scaler.

The clients passed in here decode responses to str.
"""

from __future__ import annotations

import time
from enum import StrEnum

from pydantic import BaseModel
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from core import keys


class WorkerState(StrEnum):
    """What a worker is doing."""

    STARTING = "starting"  # loading the model; takes no work yet
    IDLE = "idle"  # model loaded, nothing buffered or running
    BUSY = "busy"  # running a batch or holding jobs
    DRAINING = "draining"  # finishing its batch before it exits


class WorkerBeat(BaseModel):
    """One worker's heartbeat."""

    name: str
    state: WorkerState
    images_per_s: float | None = None
    buffered: int = 0
    running: int = 0
    pid: int | None = None
    started_at: float
    idle_since: float | None = None
    at: float
    held: list[str] = []  # broker delivery tags of the messages it holds (buffered or running)
    loop_at: float | None = None  # epoch s of the work loop's last iteration or denoising step


def publish(redis: Redis, beat: WorkerBeat, ttl_s: float) -> None:
    """Write a heartbeat that vanishes if the worker stops beating."""
    pipe = redis.pipeline(transaction=False)
    pipe.set(keys.worker(beat.name), beat.model_dump_json(), px=int(ttl_s * 1000))
    pipe.zadd(keys.WORKERS, {beat.name: beat.at})
    pipe.execute()


def retire(redis: Redis, name: str) -> None:
    """Remove a worker that exits cleanly."""
    pipe = redis.pipeline(transaction=False)
    pipe.delete(keys.worker(name))
    pipe.zrem(keys.WORKERS, name)
    pipe.execute()


def _parse(raw: list[str | bytes | None]) -> list[WorkerBeat]:
    return [WorkerBeat.model_validate_json(r) for r in raw if r]


def live(redis: Redis, ttl_s: float) -> list[WorkerBeat]:
    """Heartbeats of workers seen within `ttl_s`."""
    names = redis.zrangebyscore(keys.WORKERS, time.time() - ttl_s, "+inf")
    if not names:
        return []
    return _parse(redis.mget([keys.worker(str(n)) for n in names]))


def images_per_s(beats: list[WorkerBeat]) -> float | None:
    """The workers' measured throughput together; None while none has measured any."""
    rates = [b.images_per_s for b in beats if b.images_per_s]
    return sum(rates) if rates else None


async def live_async(redis: AsyncRedis, ttl_s: float) -> list[WorkerBeat]:
    """Heartbeats of workers seen within `ttl_s` (for the gateway)."""
    names = await redis.zrangebyscore(keys.WORKERS, time.time() - ttl_s, "+inf")
    if not names:
        return []
    raw = await redis.mget([keys.worker(str(n)) for n in names])
    return _parse(raw)


class ScalerStatus(BaseModel):
    """The scaler's last decision, exported for metrics and the queue view."""

    current: int  # workers running or starting, not draining
    desired: int
    reason: str
    at: float


def publish_scaler(redis: Redis, status: ScalerStatus, ttl_s: float) -> None:
    """Write the scaler's decision; it vanishes when no scaler decides any more."""
    redis.set(keys.SCALER_STATUS, status.model_dump_json(), px=int(ttl_s * 1000))


def scaler_status(redis: Redis) -> ScalerStatus | None:
    """The scaler's last decision; None when no scaler published one lately."""
    raw = redis.get(keys.SCALER_STATUS)
    return ScalerStatus.model_validate_json(raw) if raw else None


async def scaler_status_async(redis: AsyncRedis) -> ScalerStatus | None:
    """The scaler's last decision, for the gateway; None when no scaler published one lately."""
    raw = await redis.get(keys.SCALER_STATUS)
    return ScalerStatus.model_validate_json(raw) if raw else None
