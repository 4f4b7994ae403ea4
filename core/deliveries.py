"""The webhook side of the ledger: each job's delivery log, and the retries waiting for their time.

A retry waits in a Redis sorted set by due time rather than as a Celery countdown: kombu's Redis
transport hands an ETA message held past the visibility timeout to a second worker (a double
send hours later), and a worker that dies loses the ETA messages it holds. The set survives both;
a pump moves what is due back onto the delivery queue.
"""

from __future__ import annotations

import logging

from pydantic import ValidationError
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from core import keys, metrics
from core.broker import delivery_message
from core.events import DeliveryOrder, DeliveryRecord

log = logging.getLogger(__name__)

# A job's log keeps its latest attempts; a receiver down for days must not grow it without bound.
LOG_LIMIT = 50

_RELEASE = """
-- KEYS: retry zset, delivery queue; ARGV: member, message, member, message, ...
-- ZREM decides which of several pumps moves a member, so each retry is queued once.
local moved = 0
for i = 1, #ARGV, 2 do
  if redis.call('ZREM', KEYS[1], ARGV[i]) == 1 then
    redis.call('LPUSH', KEYS[2], ARGV[i + 1])
    moved = moved + 1
  end
end
return moved
"""


class DeliveryLog:
    """Appends and reads one job's delivery attempts."""

    def __init__(self, redis: Redis, ttl_s: int) -> None:
        self.redis = redis
        self.ttl_s = ttl_s

    def append(self, job_id: str, record: DeliveryRecord) -> None:
        """Record one attempt, keeping the newest LOG_LIMIT, expiring with the job; and count it
        (in the same step: the metrics match the logs)."""
        key = keys.webhook_log(job_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.rpush(key, record.model_dump_json())
        pipe.ltrim(key, -LOG_LIMIT, -1)
        pipe.expire(key, self.ttl_s)
        pipe.hincrby(keys.METRICS, metrics.delivery_field(record.outcome, record.attempt), 1)
        pipe.execute()

    def read(self, job_id: str) -> list[DeliveryRecord]:
        """Every recorded attempt, oldest first."""
        rows = self.redis.lrange(keys.webhook_log(job_id), 0, -1)
        return [DeliveryRecord.model_validate_json(r) for r in rows]  # type: ignore[union-attr]


async def read_log(redis: AsyncRedis, job_id: str) -> list[DeliveryRecord]:
    """A job's delivery attempts, oldest first (for the gateway)."""
    rows = await redis.lrange(keys.webhook_log(job_id), 0, -1)  # type: ignore[misc]
    return [DeliveryRecord.model_validate_json(r) for r in rows]


class RetrySchedule:
    """Delivery orders waiting for their next attempt."""

    def __init__(self, redis: Redis, queue: str) -> None:
        self.redis = redis
        self.queue = queue
        self._release = redis.register_script(_RELEASE)

    def add(self, order: DeliveryOrder, due: float) -> None:
        """Park `order` until `due` (epoch seconds); the same order twice is parked once."""
        self.redis.zadd(keys.WEBHOOK_RETRIES, {order.model_dump_json(): due})

    def release_due(self, now: float, limit: int = 100) -> int:
        """Move up to `limit` orders due by `now` onto the delivery queue; returns how many."""
        due = self.redis.zrangebyscore(keys.WEBHOOK_RETRIES, "-inf", now, start=0, num=limit)
        if not due:
            return 0
        args: list[str] = []
        for member in due:  # type: ignore[union-attr]
            try:
                order = DeliveryOrder.model_validate_json(str(member))
            except ValidationError:
                # It would block every pump at the head of the schedule, for ever: set it aside.
                log.error("a parked webhook retry cannot be read; dropped: %.200s", member)
                self.redis.zrem(keys.WEBHOOK_RETRIES, str(member))
                continue
            args += [str(member), delivery_message(order, self.queue)]
        if not args:
            return 0
        return int(self._release([keys.WEBHOOK_RETRIES, self.queue], args))  # type: ignore[arg-type]
