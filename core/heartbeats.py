"""What each worker says about itself every few seconds, for the gateway's ETA, the scaler and
the recovery sweep.

A beat is kept for an hour after the worker stops beating: the sweep reads a dead worker's last
beat to learn which dispatched jobs it held, and dispatches them again at once. Liveness is the
beat's time in `keys.WORKERS`; a worker whose work loop has not moved for `loop_stale_s` (a hung
pipeline) is not counted live either, whatever its heartbeat thread says.
The clients passed in here decode responses to str.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
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
    jobs: list[str] = []  # the jobs of those messages (the ledger recovers by job, not by tag)
    model: str = ""  # the model it serves
    prefetch: int = 0  # jobs it wants dispatched ahead of what it runs (widens the window)
    loop_at: float | None = None  # the work loop's last iteration or denoising step
    units_per_s: float | None = None  # measured work units per second

    def loop_fresh(self, now: float, stale_s: float) -> bool:
        """Whether the work loop moved within `stale_s` (a starting worker's has not begun)."""
        return self.loop_at is None or now - self.loop_at <= stale_s


KEEP_S = 3600.0  # how long a beat outlives its worker: the sweep reads what a dead one held


def publish(redis: Redis, beat: WorkerBeat, ttl_s: float = KEEP_S) -> None:
    """Write a heartbeat (its model's pool and prefetch too); it is live while it is fresh."""
    pipe = redis.pipeline(transaction=False)
    pipe.set(keys.worker(beat.name), beat.model_dump_json(), px=int(max(ttl_s, KEEP_S) * 1000))
    pipe.zadd(keys.WORKERS, {beat.name: beat.at})
    if beat.model and beat.prefetch:  # serving: its prefetch widens the model's window
        pipe.zadd(keys.pool(beat.model), {beat.name: beat.at})
        pipe.hset(keys.model(beat.model), "prefetch", beat.prefetch)
    elif beat.model:  # starting or draining: no room for more messages
        pipe.zrem(keys.pool(beat.model), beat.name)
    pipe.execute()


def retire(redis: Redis, name: str, model: str = "") -> None:
    """Remove a worker that exits cleanly."""
    pipe = redis.pipeline(transaction=False)
    pipe.delete(keys.worker(name))
    pipe.zrem(keys.WORKERS, name)
    if model:
        pipe.zrem(keys.pool(model), name)
    pipe.execute()


def forget_dead(redis: Redis, now: float) -> int:
    """Drop the entries of workers gone for longer than a beat is kept; how many."""
    names = redis.zrangebyscore(keys.WORKERS, "-inf", now - KEEP_S)
    if not names:
        return 0
    pipe = redis.pipeline(transaction=False)
    pipe.zrem(keys.WORKERS, *names)
    for model in redis.smembers(keys.MODELS):
        pipe.zremrangebyscore(keys.pool(str(model)), "-inf", now - KEEP_S)
    pipe.execute()
    return len(names)


def _parse(raw: list[str | bytes | None]) -> list[WorkerBeat]:
    return [WorkerBeat.model_validate_json(r) for r in raw if r]


def live(redis: Redis, ttl_s: float, loop_stale_s: float | None = None) -> list[WorkerBeat]:
    """Heartbeats of workers seen within `ttl_s` (and, if given, whose loop moved lately)."""
    now = time.time()
    names = redis.zrangebyscore(keys.WORKERS, now - ttl_s, "+inf")
    if not names:
        return []
    beats = _parse(redis.mget([keys.worker(str(n)) for n in names]))
    return [b for b in beats if loop_stale_s is None or b.loop_fresh(now, loop_stale_s)]


def every(redis: Redis) -> list[WorkerBeat]:
    """The last beat of every worker seen within the hour, live or dead."""
    names = redis.zrange(keys.WORKERS, 0, -1)
    if not names:
        return []
    return _parse(redis.mget([keys.worker(str(n)) for n in names]))


def images_per_s(beats: list[WorkerBeat]) -> float | None:
    """The workers' measured throughput together; None while none has measured any."""
    rates = [b.images_per_s for b in beats if b.images_per_s]
    return sum(rates) if rates else None


def units_per_s(beats: list[WorkerBeat]) -> float | None:
    """The workers' measured work units per second together; None while none measured any."""
    rates = [b.units_per_s for b in beats if b.units_per_s]
    return sum(rates) if rates else None


async def live_async(redis: AsyncRedis, ttl_s: float) -> list[WorkerBeat]:
    """Heartbeats of workers seen within `ttl_s` (for the gateway)."""
    names = await redis.zrangebyscore(keys.WORKERS, time.time() - ttl_s, "+inf")
    if not names:
        return []
    raw = await redis.mget([keys.worker(str(n)) for n in names])
    return _parse(raw)


class ScalerStatus(BaseModel):
    """The scaler's last decision for one model's pool (or, summed, the whole fleet)."""

    current: int  # workers running or starting, not draining
    desired: int
    reason: str
    at: float
    model: str = ""  # the model whose pool it scales


def publish_scaler(redis: Redis, statuses: Mapping[str, ScalerStatus], ttl_s: float) -> None:
    """Write each pool's decision, by model, in place of the last tick's; all of them vanish
    together when no scaler decides any more."""
    pipe = redis.pipeline(transaction=True)
    pipe.delete(keys.SCALER_POOLS)
    if statuses:
        pipe.hset(keys.SCALER_POOLS, mapping={m: s.model_dump_json() for m, s in statuses.items()})
        pipe.pexpire(keys.SCALER_POOLS, int(ttl_s * 1000))
    pipe.execute()


def statuses_of(raw: Mapping[str | bytes, str | bytes]) -> dict[str, ScalerStatus]:
    return {str(m): ScalerStatus.model_validate_json(v) for m, v in sorted(raw.items())}


def scaler_statuses(redis: Redis) -> dict[str, ScalerStatus]:
    """Each pool's last decision, by model; empty when no scaler published one lately."""
    return statuses_of(redis.hgetall(keys.SCALER_POOLS))


async def scaler_statuses_async(redis: AsyncRedis) -> dict[str, ScalerStatus]:
    """Each pool's last decision, by model, for the gateway."""
    return statuses_of(await redis.hgetall(keys.SCALER_POOLS))


def fleet_status(statuses: Mapping[str, ScalerStatus]) -> ScalerStatus | None:
    """The pools together: workers summed; one pool's reason, or each pool's count."""
    if not statuses:
        return None
    values = list(statuses.values())
    if len(values) == 1:
        return values[0]
    reason = ", ".join(f"{m} {s.current}->{s.desired}" for m, s in statuses.items())
    return ScalerStatus(
        current=sum(s.current for s in values),
        desired=sum(s.desired for s in values),
        reason=f"per model: {reason}",
        at=min(s.at for s in values),
    )


def scaler_status(redis: Redis) -> ScalerStatus | None:
    """The whole fleet's last decision; None when no scaler published one lately."""
    return fleet_status(scaler_statuses(redis))


async def scaler_status_async(redis: AsyncRedis) -> ScalerStatus | None:
    """The whole fleet's last decision, for the gateway."""
    return fleet_status(await scaler_statuses_async(redis))
