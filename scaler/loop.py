"""The scaler's control loop: one instance at a time, a tick every interval, a pool per model.

Each tick: hold the lock, offer to run the recovery sweep, then for each model's pool read its
signals and let the pure policy decide with that pool's state and bounds; if the lock is still
ours, apply each decision through the pool's backend and publish what was decided and why, per
model (a scaler that lost its lock mid-tick, paused or cut off, applies nothing).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from redis import Redis
from redis.exceptions import RedisError

from core import heartbeats, keys
from core.heartbeats import ScalerStatus
from core.recovery import Recovery
from scaler import signals
from scaler.backends import WorkerHandle
from scaler.policy import Decision, Signals, decide
from scaler.pools import Pool

log = logging.getLogger(__name__)

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0
"""

_HELD = """
return redis.call('GET', KEYS[1]) == ARGV[1] and redis.call('PTTL', KEYS[1]) > 0 and 1 or 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Lock:
    """A lock with a TTL in Redis: the holder renews it each tick; a dead holder's expires."""

    def __init__(self, redis: Redis, ttl_s: float) -> None:
        self.redis, self.ttl_ms = redis, int(ttl_s * 1000)
        self.token = uuid.uuid4().hex
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)
        self._held = redis.register_script(_HELD)

    def hold(self) -> bool:
        """Take or renew the lock; False while another scaler has it."""
        return bool(self._renew([keys.SCALER_LOCK], [self.token, self.ttl_ms]))

    def still_held(self) -> bool:
        """Whether the lock is still ours (it may have expired while a tick ran)."""
        return bool(self._held([keys.SCALER_LOCK], [self.token]))

    def release(self) -> None:
        """Give the lock up if still ours (in one step: it may have expired and changed hands)."""
        self._release([keys.SCALER_LOCK], [self.token])


@dataclass(frozen=True)
class Step:
    """One pool's decision in a tick, and the count it was made from."""

    pool: Pool
    current: int
    decision: Decision

    def status(self, at: float) -> ScalerStatus:
        """What the scaler publishes for this pool."""
        d = self.decision
        return ScalerStatus(current=self.current, desired=d.desired, reason=d.reason, at=at)


class ControlLoop:
    """Reads, decides, applies for every model's pool; forever, or until stopped."""

    def __init__(
        self, redis: Redis, pools: Sequence[Pool], recovery: Recovery, interval_s: float
    ) -> None:
        self.redis, self.pools, self.recovery = redis, list(pools), recovery
        self.interval_s = interval_s
        self.lock = Lock(redis, ttl_s=max(3 * interval_s, 10.0))
        self.stopped = threading.Event()
        self.holding: bool | None = None  # whether the last tick had the lock; None: no tick yet

    def run(self) -> None:
        """Tick every interval until `stop()`."""
        while not self.stopped.is_set():
            try:
                self.tick()
            except RedisError as e:
                log.warning("Redis unavailable (%s); holding the fleet as it is", e)
            except Exception:
                # One bad tick must not leave the fleet unmanaged.
                log.exception("scaler tick failed; trying again in %g s", self.interval_s)
            self.stopped.wait(self.interval_s)
        with contextlib.suppress(RedisError):
            self.lock.release()

    def stop(self, *_: object) -> None:
        """Ask the loop to end after this tick."""
        self.stopped.set()

    def tick(self) -> dict[str, Decision] | None:
        """One control step over every pool; None when another scaler holds the lock."""
        if not self._hold_lock():
            return None
        self.recovery.offer()
        steps = [step for pool in self.pools if (step := self._decide(pool)) is not None]
        if not self.lock.still_held():
            log.warning("lost the scaler lock during the tick; applying none of its decisions")
            self.holding = False
            return None
        for step in steps:
            self._apply(step)
        now = time.time()
        statuses = {step.pool.model: step.status(now) for step in steps}
        heartbeats.publish_scaler(self.redis, statuses, ttl_s=self.lock.ttl_ms / 1000)
        return {step.pool.model: step.decision for step in steps}

    def _hold_lock(self) -> bool:
        """Take or renew the lock, logging only when that changes (ticks are frequent)."""
        held = self.lock.hold()
        if held != self.holding:
            if held:
                log.info("took the scaler lock")
            else:
                log.info("another scaler holds the lock; waiting")
        self.holding = held
        return held

    def _decide(self, pool: Pool) -> Step | None:
        """The pool's decision this tick; None when its backend cannot list its workers."""
        try:
            handles = pool.backend.list_workers()
        except Exception:
            # One pool's backend failing (an API call timing out) leaves the others managed.
            log.exception("pool %s: cannot list its workers; left as it is this tick", pool.model)
            return None
        current = sum(1 for h in handles if not h.stopping)
        reading = self._read(pool, handles)
        decision, pool.state = decide(reading, current, pool.state, pool.config, time.time())
        return Step(pool, current, decision)

    def _read(self, pool: Pool, handles: list[WorkerHandle]) -> Signals | None:
        try:
            return signals.read(self.redis, pool.reading, handles)
        except RedisError as e:
            log.warning("pool %s: cannot read signals: %s", pool.model, e)
            return None

    def _apply(self, step: Step) -> None:
        pool, current, decision = step.pool, step.current, step.decision
        try:
            if decision.desired > current:
                log.info(
                    "pool %s: scale up %d -> %d: %s",
                    pool.model,
                    current,
                    decision.desired,
                    decision.reason,
                )
                pool.backend.add(decision.desired - current)
            for worker_id in decision.remove:
                log.info(
                    "pool %s: scale down %d -> %d: %s",
                    pool.model,
                    current,
                    decision.desired,
                    decision.reason,
                )
                pool.backend.drain(worker_id)
        except Exception:
            # A launch that failed is tried again next tick, when the count is still short.
            log.exception("pool %s: applying %s failed", pool.model, decision)
