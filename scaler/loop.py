"""The scaler's control loop: one instance at a time, a tick every interval.

Each tick: hold the lock, reap orphans, read signals, let the pure policy decide, apply the decision
through the backend, and publish what was decided and why.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass

from redis import Redis
from redis.exceptions import RedisError

from core import keys
from scaler import signals
from scaler.backends import ScaleBackend, WorkerHandle
from scaler.policy import Decision, PolicyConfig, PolicyState, Signals, decide
from scaler.reaper import Reaper

log = logging.getLogger(__name__)

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0
"""


class Lock:
    """A lock with a TTL in Redis: the holder renews it each tick; a dead holder's expires."""

    def __init__(self, redis: Redis, ttl_s: float) -> None:
        self.redis, self.ttl_ms = redis, int(ttl_s * 1000)
        self.token = uuid.uuid4().hex
        self._renew = redis.register_script(_RENEW)

    def hold(self) -> bool:
        """Take or renew the lock; False while another scaler has it."""
        return bool(self._renew([keys.SCALER_LOCK], [self.token, self.ttl_ms]))

    def release(self) -> None:
        """Give the lock up if it is still ours."""
        if self.redis.get(keys.SCALER_LOCK) == self.token:
            self.redis.delete(keys.SCALER_LOCK)


@dataclass(frozen=True)
class Status:
    """What the scaler last did, as exported for metrics and the API."""

    current: int
    desired: int
    reason: str
    at: float


class ControlLoop:
    """Reads, decides, applies; forever, or until stopped."""

    def __init__(
        self,
        redis: Redis,
        backend: ScaleBackend,
        reaper: Reaper,
        config: PolicyConfig,
        *,
        queue: str,
        heartbeat_ttl_s: float,
    ) -> None:
        self.redis, self.backend, self.reaper, self.config = redis, backend, reaper, config
        self.queue, self.heartbeat_ttl_s = queue, heartbeat_ttl_s
        self.lock = Lock(redis, ttl_s=max(3 * config.interval_s, 10.0))
        self.state = PolicyState()
        self.stopped = threading.Event()

    def run(self) -> None:
        """Tick every interval until `stop()`."""
        while not self.stopped.is_set():
            try:
                self.tick()
            except RedisError as e:
                log.warning("Redis unavailable (%s); holding the fleet as it is", e)
            self.stopped.wait(self.config.interval_s)
        with contextlib.suppress(RedisError):
            self.lock.release()

    def stop(self, *_: object) -> None:
        """Ask the loop to end after this tick."""
        self.stopped.set()

    def tick(self) -> Decision | None:
        """One control step; None when another scaler holds the lock."""
        if not self.lock.hold():
            log.info("another scaler holds the lock; waiting")
            return None
        reaped = self.reaper.tick()
        if reaped.requeued or reaped.failed or reaped.restored:
            log.info("reaper: %s", reaped)
        handles = self.backend.list_workers()
        current = sum(1 for h in handles if not h.stopping)
        reading = self._read(handles)
        decision, self.state = decide(reading, current, self.state, self.config, time.time())
        self._apply(decision, current)
        self._publish(Status(current, decision.desired, decision.reason, time.time()))
        return decision

    def _read(self, handles: list[WorkerHandle]) -> Signals | None:
        try:
            stranded = self.reaper.count_stranded()
            return signals.read(self.redis, self.queue, handles, self.heartbeat_ttl_s, stranded)
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

    def _publish(self, status: Status) -> None:
        payload = json.dumps(status.__dict__)
        ttl = math.ceil(self.config.interval_s * 3)
        self.redis.set(keys.SCALER_STATUS, payload, ex=max(ttl, 10))
