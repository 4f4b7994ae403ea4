"""The reaper: hands back the jobs of dead workers, and fails jobs that keep killing them.

Three kinds of orphan. A running job whose lease expired (its worker stopped renewing it) goes back
to the queue with a fresh message, or fails with `max_attempts` once it has had its tries. A
message a dead worker had received but not acked sits in kombu's `unacked` hash, where Celery
would leave it until a live worker's visibility timeout; the reaper restores it as soon as no live
worker's heartbeat says it holds it. And a queued job whose message is nowhere, neither in the
broker's lists nor in `unacked` (kombu takes a message off its list and records it as unacked in
two steps, and a worker killed between them loses it), gets a new message once two sweeps
`lost_message_s` apart have both missed it.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass

from redis import Redis, WatchError

from core import heartbeats, keys
from core.jobs import ErrorInfo, JobStatus
from core.store import JobStore

log = logging.getLogger(__name__)

JOB_ID = re.compile(r"job_[0-9a-f]{32}")  # as messages name their job (in argsrepr, in clear)


@dataclass(frozen=True)
class Reaped:
    """What one pass did."""

    requeued: int = 0
    failed: int = 0
    restored: int = 0
    republished: int = 0


class Reaper:
    """Finds orphans and hands them back."""

    def __init__(
        self,
        redis: Redis,
        store: JobStore,
        *,
        max_attempts: int,
        heartbeat_ttl_s: float,
        lost_message_s: float = 60.0,
    ) -> None:
        self.redis, self.store = redis, store
        self.max_attempts = max_attempts
        self.grace_s = heartbeat_ttl_s
        self.lost_s = lost_message_s
        self.missing: dict[str, float] = {}  # queued job -> when a sweep first found no message
        self.next_sweep = 0.0

    def tick(self) -> Reaped:
        """One pass over expired leases, stranded messages and (now and then) lost messages."""
        requeued, failed = self.expired_leases()
        return Reaped(requeued, failed, self.stranded_messages(), self.lost_messages())

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

    def lost_messages(self) -> int:
        """Give a new message to each queued job that two sweeps found no message for."""
        now = time.time()
        if now < self.next_sweep:
            return 0
        self.next_sweep = now + self.lost_s
        # Only jobs queued for a while: a submit writes its message in the same step anyway.
        queued = {str(j) for j in self.redis.zrangebyscore(keys.QUEUED, "-inf", now - self.lost_s)}
        missing = queued - self.named_in_messages() if queued else set()
        due = [j for j in missing if now - self.missing.get(j, now) >= self.lost_s]
        self.missing = {j: self.missing.get(j, now) for j in missing if j not in due}
        republished = 0
        for job_id in due:
            if self.store.republish(job_id):
                log.warning("job %s was queued with no message anywhere; sent a new one", job_id)
                republished += 1
        return republished

    def named_in_messages(self) -> set[str]:
        """The job ids that a message in the broker lists or in kombu's `unacked` hash names."""
        pipe = self.redis.pipeline(transaction=False)
        for name in keys.broker_lists(self.store.ledger.queue):
            pipe.lrange(name, 0, -1)
        pipe.hvals(keys.UNACKED)
        found: set[str] = set()
        for messages in pipe.execute():
            for raw in messages:
                found.update(JOB_ID.findall(str(raw)))
        return found

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
