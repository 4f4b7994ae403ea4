"""The reaper: hands back the jobs of dead workers, and fails jobs that keep killing them.

Two kinds of orphan. A running job whose lease expired (its worker stopped renewing it) goes back
to the queue with a fresh message, or fails with `max_attempts` once it has had its tries. A
message a dead worker had received but not acked sits in kombu's `unacked` hash, where Celery
would leave it until a live worker's visibility timeout; the reaper restores it as soon as no live
worker's heartbeat says it holds it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

from redis import Redis, WatchError

from core import heartbeats, keys
from core.jobs import ErrorInfo, JobStatus
from core.store import JobStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reaped:
    """What one pass did."""

    requeued: int = 0
    failed: int = 0
    restored: int = 0


class Reaper:
    """Finds orphans and hands them back."""

    def __init__(
        self, redis: Redis, store: JobStore, *, max_attempts: int, heartbeat_ttl_s: float
    ) -> None:
        self.redis, self.store = redis, store
        self.max_attempts = max_attempts
        self.grace_s = heartbeat_ttl_s

    def tick(self) -> Reaped:
        """One pass over expired leases and stranded messages."""
        requeued, failed = self.expired_leases()
        return Reaped(requeued, failed, self.stranded_messages())

    def expired_leases(self) -> tuple[int, int]:
        """Requeue or fail every running job whose lease ran out."""
        now = time.time()
        requeued = failed = 0
        for job_id in self.redis.zrangebyscore(keys.RUNNING, "-inf", now):
            record = self.store.get(str(job_id))
            if record is None or record.status is not JobStatus.RUNNING:
                continue
            if record.attempt >= self.max_attempts:
                failed += self._fail(record.id, record.attempt, now)
            else:
                requeued += self._requeue(record.id, record.attempt, now)
        return requeued, failed

    def _requeue(self, job_id: str, attempt: int, now: float) -> int:
        ok = self.store.try_transition(
            job_id, JobStatus.QUEUED, expect_attempt=attempt, lease_ended_by=now, score=now
        )
        if ok:
            log.warning("job %s: attempt %d lost its worker; back in the queue", job_id, attempt)
        return int(ok)

    def _fail(self, job_id: str, attempt: int, now: float) -> int:
        error = ErrorInfo(
            code="max_attempts",
            message=f"the job's worker died in each of {attempt} attempts; it will not be retried",
        )
        ok = self.store.try_transition(
            job_id,
            JobStatus.FAILED,
            expect_attempt=attempt,
            lease_ended_by=now,
            finished_at=now,
            error=error,
        )
        if ok:
            log.error("job %s failed after %d attempts", job_id, attempt)
        return int(ok)

    def stranded_messages(self) -> int:
        """Restore unacked messages that no live worker holds."""
        held = {tag for beat in heartbeats.live(self.redis, self.grace_s) for tag in beat.held}
        cutoff = time.time() - self.grace_s
        tags = self.redis.zrangebyscore(keys.UNACKED_INDEX, "-inf", cutoff)
        return sum(self._restore(str(tag)) for tag in tags if str(tag) not in held)

    def count_stranded(self) -> int:
        """How many unacked messages no live worker holds (for the policy's orphan count)."""
        held = {tag for beat in heartbeats.live(self.redis, self.grace_s) for tag in beat.held}
        tags = self.redis.zrangebyscore(keys.UNACKED_INDEX, "-inf", time.time() - self.grace_s)
        return sum(1 for tag in tags if str(tag) not in held)

    def _restore(self, tag: str) -> int:
        """Put one message back at the front of its queue, as kombu's own restore does."""
        with self.redis.pipeline() as pipe:
            try:
                pipe.watch(keys.UNACKED)  # type: ignore[no-untyped-call]
                raw = pipe.hget(keys.UNACKED, tag)
                pipe.multi()
                pipe.hdel(keys.UNACKED, tag)
                pipe.zrem(keys.UNACKED_INDEX, tag)
                if raw:
                    message, _exchange, routing_key = json.loads(raw)
                    message["headers"]["redelivered"] = True
                    pipe.rpush(routing_key, json.dumps(message))
                pipe.execute()
            except WatchError:
                return 0  # acked or restored meanwhile: nothing to do
        log.warning("restored message %s that no live worker held", tag)
        return 1 if raw else 0
