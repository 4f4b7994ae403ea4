"""Reading what the policy needs from Redis: backlog, orphans, oldest wait, worker heartbeats."""

from __future__ import annotations

import time
from collections.abc import Sequence

from redis import Redis

from core import heartbeats, keys
from core.heartbeats import WorkerBeat, WorkerState
from scaler.backends import WorkerHandle
from scaler.policy import Signals, WorkerInfo


def worker_infos(
    handles: Sequence[WorkerHandle], beats: Sequence[WorkerBeat]
) -> tuple[WorkerInfo, ...]:
    """Each worker the backend runs, in the state its heartbeat reports (none yet: starting)."""
    by_name = {b.name: b for b in beats}
    # A worker named by default beats as `dq-worker-PID@HOST`; a container or pod knows HOST only.
    by_host = {b.name.rpartition("@")[2]: b for b in beats if "@" in b.name}
    infos = []
    for handle in handles:
        beat = by_name.get(handle.hostname) or by_host.get(handle.hostname)
        state = (
            WorkerState.DRAINING
            if handle.stopping
            else (beat.state if beat else WorkerState.STARTING)
        )
        infos.append(
            WorkerInfo(
                id=handle.id,
                state=state,
                images_per_s=beat.images_per_s if beat else None,
                idle_since=beat.idle_since if beat else None,
            )
        )
    return tuple(infos)


def read(
    redis: Redis, queue: str, handles: Sequence[WorkerHandle], heartbeat_ttl_s: float, stranded: int
) -> Signals:
    """One consistent-enough reading of the queue and the fleet."""
    now = time.time()
    beats = heartbeats.live(redis, heartbeat_ttl_s)
    pipe = redis.pipeline(transaction=False)
    for name in keys.broker_lists(queue):
        pipe.llen(name)
    pipe.zcount(keys.RUNNING, "-inf", now)
    pipe.zrange(keys.QUEUED, 0, 0, withscores=True)
    *lengths, expired, oldest = pipe.execute()
    in_flight = sum(b.buffered + b.running for b in beats)
    return Signals(
        queued=sum(int(n) for n in lengths),
        in_flight=in_flight,
        orphans=int(expired) + stranded,
        oldest_wait_s=max(0.0, now - float(oldest[0][1])) if oldest else 0.0,
        workers=worker_infos(handles, beats),
    )
