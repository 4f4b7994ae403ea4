"""The worker's batch loop: buffer what Celery delivers, run a batch whenever the pipeline is free.

Celery's consumer thread calls `offer()` for each message; one runner thread forms batches with the
pure `batcher.pick` and runs them; a heartbeat thread renews leases and reports to the scaler.
Messages are acked only after the ledger holds the job's outcome, and handed back on a drain.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from redis import Redis
from redis.exceptions import RedisError

from core import heartbeats, keys
from core.heartbeats import WorkerBeat, WorkerState
from core.jobs import Bucket, JobStatus
from core.store import JobRecord, JobStore
from worker.batch import BatchContext, run_batch
from worker.batcher import Limits, Pending, pick

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delivery:
    """Settling one broker message: via Celery's event loop, or directly once that stopped."""

    tag: str  # the broker's delivery tag: the reaper restores tags no live worker holds
    ack_soon: Callable[[], object]
    requeue_soon: Callable[[], object]
    ack_now: Callable[[], object]
    requeue_now: Callable[[], object]


class Throughput:
    """Images per second, smoothed over recent batches."""

    def __init__(self, alpha: float = 0.3) -> None:
        self.alpha = alpha
        self.value: float | None = None

    def add(self, images: int, seconds: float) -> None:
        """Fold one batch in."""
        if images and seconds > 0:
            rate = images / seconds
            self.value = (
                rate if self.value is None else self.alpha * rate + (1 - self.alpha) * self.value
            )


class Runner:
    """Owns the buffer, the batch loop and the heartbeat of one worker process."""

    def __init__(
        self,
        redis: Redis,
        store: JobStore,
        limits: Limits,
        make_context: Callable[[], BatchContext],
        *,
        name: str,
        queue: str,
        heartbeat_s: float,
        prefetch: int,
    ) -> None:
        self.redis, self.store, self.limits = redis, store, limits
        self.make_context = make_context
        self.name, self.queue, self.heartbeat_s, self.prefetch = name, queue, heartbeat_s, prefetch
        self.cond = threading.Condition()
        self.inbox: list[tuple[str, Delivery, float]] = []  # received, not yet read from the ledger
        self.pending: list[Pending[Delivery]] = []
        self.records: dict[str, JobRecord] = {}
        self.running = 0
        self.current: list[Delivery] = []  # the messages of the batch being run
        self.stopping = threading.Event()  # the batch loop takes no new batch
        self.silenced = threading.Event()  # the heartbeat stops (after the last batch)
        self.started_at = time.time()
        self.idle_since: float | None = None
        self.rate = Throughput()
        self.ctx: BatchContext | None = None
        self.threads: list[threading.Thread] = []

    # --- called from Celery's consumer thread -------------------------------------------------

    def offer(self, job_id: str, delivery: Delivery) -> None:
        """Buffer one received message; the loop reads its job and batches it."""
        with self.cond:
            self.inbox.append((job_id, delivery, time.monotonic()))
            self.cond.notify()

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the batch loop and the heartbeat."""
        for target, label in ((self._loop, "batches"), (self._beat_loop, "heartbeat")):
            thread = threading.Thread(target=target, name=f"dq-{label}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def stop(self, timeout: float) -> None:
        """Drain: finish the running batch, hand buffered messages back, stop beating."""
        self.stopping.set()
        with self.cond:
            self.cond.notify_all()
        self.threads[0].join(timeout)
        with self.cond:
            returned = [d for _, d, _ in self.inbox] + [p.handle for p in self.pending]
            self.inbox.clear()
            self.pending.clear()
        for delivery in returned:
            delivery.requeue_now()
        log.info("drained: %d buffered message(s) handed back to the queue", len(returned))
        self.silenced.set()
        self.threads[1].join(timeout=2)
        try:
            heartbeats.retire(self.redis, self.name)
        except RedisError:
            log.warning("could not retire heartbeat of %s", self.name)

    # --- the batch loop ----------------------------------------------------------------------

    def _loop(self) -> None:
        self.ctx = self.make_context()  # loads the model: the slow part of starting
        log.info("worker %s ready", self.name)
        while not self.stopping.is_set():
            try:
                self._step()
            except RedisError as e:
                log.warning("Redis unavailable (%s); retrying in 1 s", e)
                time.sleep(1)

    def _step(self) -> None:
        self._hydrate()
        with self.cond:
            choice = pick(self.pending, self.limits, time.monotonic(), self._more_coming())
            if not choice.batch:
                timeout = (
                    None if choice.wake_at is None else max(0.0, choice.wake_at - time.monotonic())
                )
                if not self.inbox:
                    self.cond.wait(timeout=min(timeout, 1.0) if timeout is not None else 1.0)
                return
            taken = {p.job_id for p in choice.batch}
            self.pending = [p for p in self.pending if p.job_id not in taken]
        self._run(list(choice.batch))

    def _run(self, batch: list[Pending[Delivery]]) -> None:
        assert self.ctx is not None
        bucket: Bucket = batch[0].bucket
        records = [self.records.pop(p.job_id) for p in batch]
        self.running = len(batch)
        self.current = [p.handle for p in batch]
        start = time.monotonic()
        try:
            made = run_batch(self.ctx, records, bucket, self.limits.capacity(bucket))
        except RedisError:
            # The ledger is unreachable: keep the messages unacked so they come back.
            for p in batch:
                self._settle(p.handle, ack=False)
            raise
        except Exception:
            log.exception("batch of %d job(s) crashed; their messages go back", len(batch))
            for p in batch:
                self._settle(p.handle, ack=False)
            return
        finally:
            self.running, self.current = 0, []
        self.rate.add(made, time.monotonic() - start)
        for p in batch:
            self._settle(p.handle, ack=True)

    def _settle(self, delivery: Delivery, *, ack: bool) -> None:
        """Ack or requeue; once draining, Celery's loop no longer runs, so settle directly."""
        if self.stopping.is_set():
            (delivery.ack_now if ack else delivery.requeue_now)()
        else:
            (delivery.ack_soon if ack else delivery.requeue_soon)()

    def _more_coming(self) -> bool:
        """True while the broker holds messages this worker could still receive."""
        if len(self.pending) + len(self.inbox) >= self.prefetch:
            return False
        pipe = self.redis.pipeline(transaction=False)
        for name in keys.broker_lists(self.queue):
            pipe.llen(name)
        return sum(int(n) for n in pipe.execute()) > 0

    def _hydrate(self) -> None:
        """Read the jobs of newly received messages; settle those that need no run."""
        with self.cond:
            inbox, self.inbox = self.inbox, []
        if not inbox:
            return
        records = self.store.get_many([job_id for job_id, _, _ in inbox])
        fresh = []
        for (job_id, delivery, arrived), record in zip(inbox, records, strict=True):
            if record is None or record.status is not JobStatus.QUEUED or job_id in self.records:
                log.info(
                    "job %s is %s; message settled without a run",
                    job_id,
                    record.status.value if record else "gone",
                )
                self._settle(delivery, ack=True)
                continue
            self.records[job_id] = record
            bucket = Bucket.of(record.request)
            fresh.append(Pending(job_id, bucket, record.request.num_images, arrived, delivery))
        with self.cond:
            self.pending.extend(fresh)

    # --- heartbeat ---------------------------------------------------------------------------

    def _beat_loop(self) -> None:
        while True:
            try:
                self.beat()
            except RedisError as e:
                log.warning("heartbeat failed: %s", e)
            if self.silenced.wait(self.heartbeat_s):
                return

    def current_state(self, busy: bool) -> WorkerState:
        """What the worker is doing now, read off its threads rather than kept by hand."""
        if self.stopping.is_set():
            return WorkerState.DRAINING
        if self.ctx is None:
            return WorkerState.STARTING
        if busy:
            self.idle_since = None
            return WorkerState.BUSY
        if self.idle_since is None:
            self.idle_since = time.time()
        return WorkerState.IDLE

    def beat(self) -> None:
        """Renew the leases of running jobs and publish this worker's state."""
        ctx = self.ctx
        if ctx is not None:
            for c in list(ctx.running.values()):
                if c.live:
                    self.store.try_transition(
                        c.job_id,
                        JobStatus.RUNNING,
                        expect_attempt=c.attempt,
                        score=time.time() + ctx.lease_s,
                    )
        with self.cond:
            buffered = len(self.pending) + len(self.inbox)
            held = [d.tag for _, d, _ in self.inbox] + [p.handle.tag for p in self.pending]
        held += [d.tag for d in self.current]
        beat = WorkerBeat(
            name=self.name,
            state=self.current_state(bool(buffered or self.running)),
            images_per_s=self.rate.value,
            buffered=buffered,
            running=self.running,
            pid=os.getpid(),
            started_at=self.started_at,
            idle_since=self.idle_since,
            at=time.time(),
            held=held,
        )
        heartbeats.publish(self.redis, beat, ttl_s=self.heartbeat_s * 3)
