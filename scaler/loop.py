"""The scaler's control loop: one instance at a time, a tick every interval.

Each tick: hold the lock, offer to run the recovery sweep, read signals, let the pure policy
decide, and, if the lock is still ours, apply the decision through the backend and publish what
was decided and why (a scaler that lost its lock mid-tick, paused or cut off, applies nothing).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid

from redis import Redis
from redis.exceptions import RedisError

from core import heartbeats, keys
from core.heartbeats import ScalerStatus
from core.recovery import Recovery
from scaler import signals
from scaler.backends import ScaleBackend, WorkerHandle
from scaler.policy import Decision, PolicyConfig, PolicyState, Signals, decide
from scaler.signals import Reading

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


class ControlLoop:
    """Reads, decides, applies; forever, or until stopped."""

    def __init__(
        self,
        redis: Redis,
        backend: ScaleBackend,
        recovery: Recovery,
        config: PolicyConfig,
        reading: Reading,
    ) -> None:
        self.redis, self.backend, self.recovery, self.config = redis, backend, recovery, config
        self.reading = reading
        self.lock = Lock(redis, ttl_s=max(3 * config.interval_s, 10.0))
        self.state = PolicyState()
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
                # One bad tick (a backend call that failed) must not leave the fleet unmanaged.
                log.exception("scaler tick failed; trying again in %g s", self.config.interval_s)
            self.stopped.wait(self.config.interval_s)
        with contextlib.suppress(RedisError):
            self.lock.release()

    def stop(self, *_: object) -> None:
        """Ask the loop to end after this tick."""
        self.stopped.set()

    def tick(self) -> Decision | None:
        """One control step; None when another scaler holds the lock."""
        if not self._hold_lock():
            return None
        self.recovery.offer()
        handles = self.backend.list_workers()
        current = sum(1 for h in handles if not h.stopping)
        reading = self._read(handles)
        decision, self.state = decide(reading, current, self.state, self.config, time.time())
        if not self.lock.still_held():
            log.warning("lost the scaler lock during the tick; not applying %s", decision)
            self.holding = False
            return None
        self._apply(decision, current)
        status = ScalerStatus(
            current=current,
            desired=decision.desired,
            reason=decision.reason,
            at=time.time(),
            model=self.reading.model,
        )
        heartbeats.publish_scaler(self.redis, status, ttl_s=self.lock.ttl_ms / 1000)
        return decision

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

    def _read(self, handles: list[WorkerHandle]) -> Signals | None:
        try:
            return signals.read(self.redis, self.reading, handles)
        except RedisError as e:
            log.warning("cannot read signals: %s", e)
            return None

    def _apply(self, decision: Decision, current: int) -> None:
        if decision.desired > current:
            log.info("scale up %d -> %d: %s", current, decision.desired, decision.reason)
            self.backend.add(decision.desired - current)
        for worker_id in decision.remove:
            log.info("scale down %d -> %d: %s", current, decision.desired, decision.reason)
            self.backend.drain(worker_id)
