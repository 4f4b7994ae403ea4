"""The recovery sweep: the ledger repairs itself, from whichever process gets to run it.

Every worker, the scaler and the gateway offer to sweep every `interval_s`; a lock in Redis picks
one, so recovery runs in any shape of deployment (with the dq scaler, with KEDA, with none). A
sweep decides from the ledger alone, and each part and each job in it fails alone:

- a running job whose lease expired (its worker stopped renewing) goes back to the front of its
  tenant's line, or fails with `max_attempts` once it has had its tries;
- a dispatched job that no live worker holds and no message in its broker list names is
  dispatched again: at once when a dead worker's last heartbeat held it, or kombu's record shows
  its message received by no live worker, else once two sweeps `lost_s` apart both missed it
  (kombu takes a message off its list and records it as received in two steps; a worker killed
  between them leaves no trace of it);
- kombu's record of job messages received by dead workers is dropped (the ledger has dispatched
  those jobs again; Celery would otherwise put a second copy back after its visibility timeout);
- a job not started by its deadline fails with `deadline_exceeded`;
- an expired job's images and inputs are deleted and it leaves its tenant's index;
- the entries of workers gone for an hour are dropped.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from redis import Redis
from redis.exceptions import RedisError

from core import broker, heartbeats, keys
from core.jobs import ErrorInfo
from core.settings import Settings
from core.storage import ObjectStore, job_folder
from core.store import Change, JobStore

log = logging.getLogger(__name__)

BATCH = 200  # items of one kind a sweep handles at most (the next sweep takes the rest)


@dataclass
class Swept:
    """What one sweep did."""

    requeued: int = 0
    failed: int = 0
    redispatched: int = 0
    forgotten: int = 0
    deadlines: int = 0
    expired: int = 0

    def __bool__(self) -> bool:
        return any(vars(self).values())


@dataclass(frozen=True)
class RecoveryConfig:
    """The sweep's knobs (from settings)."""

    max_attempts: int = 3
    heartbeat_ttl_s: float = 15.0  # a worker is live while its heartbeat is this fresh
    loop_stale_s: float = 120.0  # ... and its work loop moved within this
    lost_s: float = 60.0  # a dispatched job missing this long (two sweeps) is dispatched again
    interval_s: float = 5.0  # the least time between two sweeps, whoever runs them

    @classmethod
    def of(cls, settings: Settings) -> RecoveryConfig:
        """The sweep's knobs from settings."""
        return cls(
            max_attempts=settings.max_attempts,
            heartbeat_ttl_s=settings.heartbeat_s * 3,
            loop_stale_s=settings.loop_stale_s,
            lost_s=settings.lost_message_s,
            interval_s=settings.sweep_interval_s,
        )


@dataclass
class Recovery:
    """Finds what the ledger lost track of and puts it right."""

    redis: Redis
    store: JobStore
    config: RecoveryConfig
    storage: ObjectStore | None = None  # where expired jobs' images are deleted (None: nowhere)
    prefix: str = ""
    missing: dict[str, float] = field(default_factory=dict)  # job -> when first seen unheld
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    def offer(self) -> Swept | None:
        """Sweep if no process swept within the interval; None when another one did."""
        ms = int(self.config.interval_s * 1000)
        if not self.redis.set(keys.SWEEP_LOCK, self.token, nx=True, px=ms):
            return None
        swept = self.sweep()
        if swept:
            log.info("recovery: %s", swept)
        return swept

    def sweep(self) -> Swept:
        """One pass of every part; a part that fails is logged and the others still run."""
        swept, now = Swept(), time.time()
        parts: list[tuple[str, Callable[[Swept, float], None]]] = [
            ("expired leases", self.expired_leases),
            ("lost dispatches", self.lost_dispatches),
            ("deadlines", self.deadlines),
            ("expired jobs", self.expired_jobs),
            ("dead workers", self.dead_workers),
        ]
        for name, part in parts:
            try:
                part(swept, now)
            except RedisError as e:
                log.warning("recovery: %s skipped, Redis unavailable (%s)", name, e)
            except Exception:
                log.exception("recovery: %s failed; the next sweep tries again", name)
        return swept

    def expired_leases(self, swept: Swept, now: float) -> None:
        """Hand back (or fail) every running job whose lease ran out."""
        for job_id in self.redis.zrangebyscore(keys.RUNNING, "-inf", now, start=0, num=BATCH):
            job_id = str(job_id)
            attempt = int(self.redis.hget(keys.job(job_id), "attempt") or 0)  # type: ignore[arg-type]
            if attempt >= self.config.max_attempts:
                swept.failed += self._give_up(job_id, attempt, now)
            else:
                swept.requeued += self._one(
                    "requeued",
                    Change("handback", job_id, attempt=attempt, cutoff=now),
                    "job %s: attempt %d lost its worker; back at the front of its line",
                    attempt,
                )

    def _give_up(self, job_id: str, attempt: int, now: float) -> int:
        error = ErrorInfo(
            code="max_attempts",
            message=f"the job's worker died in each of {attempt} attempts; it will not be retried",
        )
        change = Change(
            "fail",
            job_id,
            attempt=attempt,
            cutoff=now,
            fields={"finished_at": now, "error": error},
        )
        return self._one("failed", change, "job %s failed after %d attempts", attempt)

    def _one(self, action: str, change: Change, message: str, *args: object) -> int:
        """Apply one change, isolated: a job that cannot be changed does not stop the sweep."""
        try:
            applied = self.store.change(change)
        except RedisError:
            raise
        except Exception:
            log.exception("recovery: job %s could not be changed", change.job_id)
            return 0
        if applied.ok:
            log.warning(message, change.job_id, *args)
            self.redis.hincrby(keys.METRICS, f"reaper:{action}", 1)
        return int(applied.ok)

    def lost_dispatches(self, swept: Swept, now: float) -> None:
        """Dispatch again the jobs whose message no live worker holds and no list names."""
        beats = heartbeats.every(self.redis)
        live = [b for b in beats if self._alive(b, now)]
        held_live = {j for b in live for j in b.jobs}
        models = sorted(str(m) for m in self.redis.smembers(keys.MODELS))
        queues = [self.store.ledger.queue_of(m) for m in models]
        grace = now - self.config.heartbeat_ttl_s
        # Messages received by no live worker: their worker is gone, perhaps before a beat could
        # name them. Their jobs go out again at once, like the jobs a dead worker's beat names.
        tags = {t for b in live for t in b.held}
        dropped = broker.forget_received(self.redis, queues, tags, grace)
        swept.forgotten += dropped.messages
        # When a dead worker last said it held each job (a beat is kept for an hour: it says
        # nothing of the job's dispatches after it).
        held_dead = dict.fromkeys(dropped.jobs, now)
        for b in beats:
            if b not in live:
                held_dead.update((j, max(b.at, held_dead.get(j, b.at))) for j in b.jobs)
        sent: dict[str, float] = {}  # dispatched job -> when
        for model in models:
            old = self.redis.zrangebyscore(keys.dispatched(model), "-inf", grace, 0, BATCH, True)
            sent.update((str(pair[0]), float(pair[1])) for pair in old)  # type: ignore[union-attr]
        dead = {j for j, at in sent.items() if held_dead.get(j, -1.0) >= at} - held_live
        unheld = set(sent) - held_live
        if unheld:
            unheld -= broker.named_in_lists(self.redis, queues)
        due = [
            j for j in unheld if j in dead or now - self.missing.get(j, now) >= self.config.lost_s
        ]
        self.missing = {j: self.missing.get(j, now) for j in unheld if j not in due}
        for job_id in due:
            why = "its worker died" if job_id in dead else "its message was lost"
            swept.redispatched += self._one(
                "redispatched",
                Change("undispatch", job_id, cutoff=grace),
                "job %s was dispatched but %s; dispatched again",
                why,
            )

    def _alive(self, beat: heartbeats.WorkerBeat, now: float) -> bool:
        fresh = now - beat.at <= self.config.heartbeat_ttl_s
        return fresh and beat.loop_fresh(now, self.config.loop_stale_s)

    def deadlines(self, swept: Swept, now: float) -> None:
        """Fail every job whose deadline passed before it ended."""
        due = self.redis.zrangebyscore(keys.DEADLINES, "-inf", now, start=0, num=BATCH)
        for job_id in (str(j) for j in due):
            error = ErrorInfo(
                code="deadline_exceeded", message="the job did not finish before its deadline"
            )
            change = Change("fail", job_id, fields={"finished_at": now, "error": error})
            if not self._one("deadline", change, "job %s passed its deadline"):
                self.redis.zrem(keys.DEADLINES, job_id)
            else:
                swept.deadlines += 1

    def expired_jobs(self, swept: Swept, now: float) -> None:
        """Delete the objects of expired jobs and drop them from their tenant's index."""
        expiring = self.redis.zrangebyscore(keys.EXPIRING, "-inf", now, start=0, num=BATCH)
        for member in (str(m) for m in expiring):
            tenant, _, job_id = member.partition(" ")
            if self.storage is not None:
                self.storage.delete_folder(job_folder(self.prefix, job_id))
            pipe = self.redis.pipeline(transaction=False)
            pipe.zrem(keys.tenant_jobs(tenant), job_id)
            pipe.zrem(keys.EXPIRING, member)
            pipe.execute()
            swept.expired += 1

    def dead_workers(self, swept: Swept, now: float) -> None:
        """Drop the entries of workers gone for longer than a heartbeat is kept."""
        heartbeats.forget_dead(self.redis, now)
