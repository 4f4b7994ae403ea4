"""Reading what the policy needs from the ledger: backlog, oldest wait, worker heartbeats."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

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


def _capacity(beat: WorkerBeat, now: float, loop_stale_s: float) -> WorkerBeat:
    """A worker whose loop is stale (a hung call) offers no capacity: it counts as draining."""
    if beat.loop_fresh(now, loop_stale_s):
        return beat
    return beat.model_copy(update={"state": WorkerState.DRAINING, "images_per_s": None})


@dataclass(frozen=True)
class Reading:
    """What to read for one model's pool."""

    model: str
    heartbeat_ttl_s: float
    loop_stale_s: float = 120.0
    low_scales: bool = True  # False: `low` work alone adds no worker above the minimum


def read(redis: Redis, reading: Reading, handles: Sequence[WorkerHandle]) -> Signals:
    """One consistent-enough reading of a model's backlog (in images) and its pool.

    The backlog is the ledger's: images waiting in the tenants' lines, dispatched (in the broker
    or a worker's buffer) and running. A worker whose work loop is stale gives no capacity.
    """
    now, model = time.time(), reading.model
    beats = [
        _capacity(b, now, reading.loop_stale_s)
        for b in heartbeats.live(redis, reading.heartbeat_ttl_s)
        if b.model in ("", model)
    ]
    classes = keys.CLASSES if reading.low_scales else keys.CLASSES[:-1]
    pipe = redis.pipeline(transaction=False)
    pipe.hgetall(keys.STATS)
    pipe.zcount(keys.RUNNING, "-inf", now)
    for klass in classes:
        pipe.zrange(keys.waiting(model, klass), 0, 0, withscores=True)
    pipe.zrange(keys.dispatched(model), 0, 0)
    stats, expired, *oldest, first_out = pipe.execute()
    waiting = sum(int(stats.get(f"wimages:{model}:{c}", 0)) for c in classes)
    dispatched = int(stats.get(f"dimages:{model}", 0))
    created = [float(o[0][1]) for o in oldest if o]
    if first_out:
        sent = redis.hget(keys.job(str(first_out[0])), "created_at")
        created += [float(sent)] if sent else []  # type: ignore[arg-type]
    return Signals(
        queued=waiting + dispatched,
        in_flight=int(stats.get(f"rimages:{model}", 0)),
        orphans=0,  # running jobs whose lease expired are counted in `in_flight` already
        oldest_wait_s=max(0.0, now - min(created)) if created else 0.0,
        workers=worker_infos(handles, beats),
        expired_leases=int(expired),
    )
