"""The worker's batch loop: buffer what Celery delivers, run a batch whenever the pipeline is free.

Celery's consumer thread calls `offer()` for each message; one runner thread forms batches with the
pure `batcher.pick` and runs their pipeline calls; a storing thread encodes and stores each batch's
images and finishes its jobs while the next batch runs (one batch at a time, so images never pile
up); a heartbeat thread renews leases and reports to the scaler. Messages are acked only after the
ledger holds the job's outcome, and handed back on a drain.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from redis import Redis
from redis.exceptions import RedisError

from core import heartbeats, keys
from core.heartbeats import WorkerBeat, WorkerState
from core.jobs import Bucket, JobStatus
from core.store import JobRecord, JobStore
from worker.batch import BatchContext, Ran, renew, run_models, store_batch
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
        self.storing: list[Delivery] = []  # the messages of the batch being stored
        self.stored: Future[None] | None = None  # when that batch is stored and settled
        self.store_thread = ThreadPoolExecutor(1, thread_name_prefix="dq-store")
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
        self._wait_stored()
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
        deliveries = [p.handle for p in batch]
        self.running, self.current = len(batch), deliveries
        start = time.monotonic()
        try:
            ran = run_models(self.ctx, records, bucket, self.limits.capacity(bucket))
        except RedisError:
            # The ledger is unreachable: keep the messages unacked so they come back.
            self._settle_all(deliveries, ack=False)
            self.running, self.current = 0, []
            raise
        except Exception:
            log.exception("batch of %d job(s) crashed; their messages go back", len(batch))
            self._settle_all(deliveries, ack=False)
            self.running, self.current = 0, []
            return
        self.rate.add(ran.images, time.monotonic() - start)
        self._wait_stored()  # the batch before this one
        # Held by the storing thread from here: the heartbeat never loses sight of these tags.
        self.storing = deliveries
        self.running, self.current = 0, []
        self.stored = self.store_thread.submit(self._store, ran, deliveries)

    def _store(self, ran: Ran, deliveries: Sequence[Delivery]) -> None:
        """Store a run batch and settle its messages (in the storing thread)."""
        assert self.ctx is not None
        try:
            store_batch(self.ctx, ran)
        except Exception:
            # Ledger or store unreachable: the messages come back and the ledger decides.
            log.exception(
                "storing a batch of %d job(s) failed; their messages go back", len(ran.claims)
            )
            self._settle_all(deliveries, ack=False)
        else:
            self._settle_all(deliveries, ack=True)
        finally:
            self.storing = []

    def _wait_stored(self) -> None:
        """Block until the batch being stored is stored and settled."""
        if self.stored is not None:
            self.stored.result()
            self.stored = None

    def _settle_all(self, deliveries: Sequence[Delivery], *, ack: bool) -> None:
        for delivery in deliveries:
            self._settle(delivery, ack=ack)

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
            renew(ctx, list(ctx.running.values()))
        with self.cond:
            buffered = len(self.pending) + len(self.inbox)
            held = [d.tag for _, d, _ in self.inbox] + [p.handle.tag for p in self.pending]
        held += [d.tag for d in self.current] + [d.tag for d in self.storing]
        beat = WorkerBeat(
            name=self.name,
            state=self.current_state(bool(buffered or self.running or self.storing)),
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
