"""The worker's batch loop: buffer what Celery delivers, run a batch whenever the pipeline is free.

Celery's consumer thread calls `offer()` for each message; one runner thread forms batches with the
pure `batcher.pick` and runs their pipeline calls; a storing thread encodes and stores each batch's
images and finishes its jobs while the next batch runs (one batch at a time, so images never pile
up); a heartbeat thread renews leases, reports to the scaler and offers to run the recovery sweep.
Messages are acked only after the ledger holds the job's outcome; on a drain, buffered jobs go
back to the front of their tenant's line.

No thread dies silently. A failure of the batch loop is logged with its jobs and retried after a
pause; a model that cannot load, or the same failure `max_failures` times in a row, ends the
process with a non-zero code so that its supervisor replaces it. So does a call whose every row
was canceled and that will not stop: a worker would rather restart than finish work nobody wants.
So does what no `except Exception` sees (a library's SystemExit) and a work loop that stopped
moving (a wedged call): the heartbeat thread would otherwise renew the leases of its jobs forever.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from redis import Redis
from redis.exceptions import RedisError

from core import broker, heartbeats, keys
from core.heartbeats import WorkerBeat, WorkerState
from core.jobs import Bucket, JobStatus
from core.records import JobRecord, Unreadable
from core.store import Change, JobStore
from worker.batch import BatchResult, run_models, store_batch
from worker.batcher import Limits, Pending, fair_order, pick
from worker.claims import BatchContext, overdue, renew

log = logging.getLogger(__name__)

EXIT_MODEL_FAILED = 3  # the model could not be loaded
EXIT_LOOP_FAILED = 4  # the batch loop failed the same way too many times in a row
EXIT_ABANDONED = 5  # a canceled call would not stop: restart rather than finish it
STORE_GRACE_S = 30.0  # on the way out, how long a batch being stored may take to finish


@dataclass(frozen=True)
class Message:
    """Settling one broker message: via Celery's event loop, or directly once that stopped."""

    tag: str  # the broker's message tag
    ack_soon: Callable[[], object]
    requeue_soon: Callable[[], object]
    ack_now: Callable[[], object]
    requeue_now: Callable[[], object]


class Throughput:
    """A rate smoothed over recent batches."""

    def __init__(self, alpha: float = 0.3) -> None:
        self.alpha = alpha
        self.value: float | None = None

    def add(self, amount: float, seconds: float) -> None:
        """Fold one batch in."""
        if amount and seconds > 0:
            rate = amount / seconds
            self.value = (
                rate if self.value is None else self.alpha * rate + (1 - self.alpha) * self.value
            )


@dataclass(frozen=True)
class Supervision:
    """How the worker watches itself."""

    max_failures: int = 5  # the same batch-loop failure this many times in a row: exit
    cancel_grace_s: float = 10.0  # a fully canceled call still running after this: exit
    loop_stale_s: float = 120.0  # the work loop has not moved for this long (a wedged call): exit
    sweep: Callable[[], object] | None = None  # the recovery sweep this worker offers to run


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
        model: str,
        queue: str,
        heartbeat_s: float,
        prefetch: int,
        supervision: Supervision | None = None,
        fair: bool = True,
        exit: Callable[[int], None] = os._exit,
    ) -> None:
        """`fair`: take the jobs held here in `batcher.fair_order` (fair dispatch), not arrival."""
        self.redis, self.store, self.limits = redis, store, limits
        self.fair = fair
        self.make_context = make_context
        self.name, self.model, self.queue = name, model, queue
        self.heartbeat_s, self.prefetch = heartbeat_s, prefetch
        self.supervision = supervision or Supervision()
        self.exit = exit
        self.cond = threading.Condition()
        self.inbox: list[tuple[str, Message, float]] = []  # received, not yet read from the ledger
        self.pending: list[Pending[Message]] = []
        self.records: dict[str, JobRecord] = {}
        self.running = 0
        self.current: list[Message] = []  # the messages of the batch being run
        self.storing: list[Message] = []  # the messages of the batch being stored
        self.stored: Future[None] | None = None  # when that batch is stored and settled
        self.store_thread = ThreadPoolExecutor(1, thread_name_prefix="dq-store")
        self.stopping = threading.Event()  # the batch loop takes no new batch
        self.silenced = threading.Event()  # the heartbeat stops (after the last batch)
        self.started_at = time.time()
        self.loop_at: float | None = None  # the work loop's last iteration or denoising step
        self.idle_since: float | None = None
        self.rate = Throughput()
        self.unit_rate = Throughput()
        self.cycle_end = 0.0  # monotonic end of the last batch's cycle (the throughput's clock)
        self.ctx: BatchContext | None = None
        self.threads: list[threading.Thread] = []
        self.failures: tuple[str, int] = ("", 0)  # the last loop failure and how often in a row
        self.looked_at: float | None = None  # when the heartbeat thread last checked the loop

    # --- called from Celery's consumer thread -------------------------------------------------

    def offer(self, job_id: str, message: Message) -> None:
        """Buffer one received message; the loop reads its job and batches it."""
        with self.cond:
            self.inbox.append((job_id, message, time.monotonic()))
            self.cond.notify()

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the batch loop and the heartbeat."""
        for target, label in ((self._loop, "batches"), (self._beat_loop, "heartbeat")):
            thread = threading.Thread(target=target, name=f"dq-{label}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def stop(self, timeout: float) -> None:
        """Drain: finish the running batch, hand buffered jobs back, stop beating."""
        self.stopping.set()
        with self.cond:
            self.cond.notify_all()
        self.threads[0].join(timeout)
        self._finish_work(timeout)
        self._hand_back()
        self.silenced.set()
        self.threads[1].join(timeout=2)
        try:
            heartbeats.retire(self.redis, self.name, self.model)
        except RedisError:
            log.warning("could not retire heartbeat of %s", self.name)

    def _finish_work(self, timeout: float) -> None:
        """Draining: what runs finishes and is stored (the batch being stored, here)."""
        self._wait_stored()

    def _hand_back(self) -> None:
        """Buffered jobs go back to the front of their tenant's line; their messages are acked."""
        with self.cond:
            returned = [(j, d) for j, d, _ in self.inbox] + [
                (p.job_id, p.handle) for p in self.pending
            ]
            self.inbox.clear()
            self.pending.clear()
        for job_id, message in returned:
            try:
                # Only if still dispatched: a duplicate message of a job running (here or
                # anywhere) must never take it from its attempt.
                self.store.change(Change("undispatch", job_id))
                message.ack_now()
            except RedisError:
                message.requeue_now()  # the ledger is away: the message goes back instead
        log.info("drained: %d buffered job(s) handed back", len(returned))

    def fatal(self, code: int, why: str) -> None:
        """End the process for its supervisor to replace it, handing back what can be."""
        log.critical("worker %s exits (code %d): %s", self.name, code, why)
        self.stopping.set()
        stored = self.stored
        if stored is not None:  # images made are worth the wait: their jobs need no second run
            wait([stored], timeout=STORE_GRACE_S)
        try:
            self._hand_back()
            heartbeats.retire(self.redis, self.name, self.model)
        except Exception:  # on the way out: the ledger's recovery covers what is left
            log.exception("could not hand back before exiting")
        logging.shutdown()
        self.exit(code)

    # --- the batch loop ----------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as e:
            # Not an Exception (those are handled round by round): a SystemExit raised by a
            # library, say. Left alone it would end this thread without a word, the heartbeat
            # thread going on as if the worker worked.
            notes = "; ".join(getattr(e, "__notes__", []))
            log.critical("the batch loop broke off: %r %s", e, notes, exc_info=True)
            self.fatal(EXIT_LOOP_FAILED, f"the batch loop broke off ({e!r}) {notes}".strip())

    def _serve(self) -> None:
        try:
            self.ctx = self.make_context()  # loads the model: the slow part of starting
            self._started()
        except Exception as e:
            log.exception("the model could not be loaded")
            self.fatal(EXIT_MODEL_FAILED, f"the model could not be loaded: {e}")
            return
        self.ctx.on_step = self._stamp
        log.info("worker %s ready (model %s)", self.name, self.model)
        while not self.stopping.is_set():
            self._stamp()
            try:
                self._step()
                self.failures = ("", 0)
            except RedisError as e:
                log.warning("Redis unavailable (%s); retrying in 1 s", e)
                time.sleep(1)
            except Exception as e:
                self._failed(e)

    def _started(self) -> None:
        """The model is loaded: anything else to start before serving (nothing, here)."""

    def _stamp(self) -> None:
        self.loop_at = time.time()

    def _failed(self, error: Exception) -> None:
        """A failure of the loop itself (not of a job): log it with its jobs, pause, maybe exit."""
        kind = f"{type(error).__name__}: {error}"
        seen, times = self.failures
        times = times + 1 if kind == seen else 1
        self.failures = (kind, times)
        with self.cond:
            held = [p.job_id for p in self.pending] + [j for j, _, _ in self.inbox]
        log.exception("the batch loop failed (%d in a row); jobs held: %s", times, held)
        if times >= self.supervision.max_failures:
            self.fatal(EXIT_LOOP_FAILED, f"the batch loop failed {times} times in a row: {kind}")
        time.sleep(min(2.0**times * 0.1, 5.0))

    def _step(self) -> None:
        self._hydrate()
        with self.cond:
            choice = pick(self._ordered(), self.limits, time.monotonic(), self._more_coming())
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

    def _run(self, batch: list[Pending[Message]]) -> None:
        ctx = self.ctx
        assert ctx is not None
        bucket: Bucket = batch[0].bucket
        records = [self.records.pop(p.job_id) for p in batch]
        capacity = self.limits.capacity(bucket)
        ids = [r.id for r in records]
        self._call(
            [p.handle for p in batch],
            ids,
            lambda: run_models(ctx, records, bucket, capacity),
            min(p.arrived for p in batch),
        )

    def _call(
        self,
        messages: list[Message],
        ids: list[str],
        run: Callable[[], BatchResult],
        arrived: float | None = None,
    ) -> None:
        """Run a batch's pipeline calls; it is stored on the storing thread while the next runs.

        The throughput counts the batch's whole cycle, from the last cycle's end (or, if the
        worker sat idle until its first job came, from the call's start) to when the batch before
        it is stored: on a steady queue that is what the work ahead of a job takes."""
        self.running, self.current = len(messages), messages
        start = time.monotonic()
        try:
            result = run()
        except BaseException as e:
            # The claims failed (the ledger is away) or the loop broke: the messages go back,
            # and the ledger decides what runs. Whoever logs the error names the jobs.
            e.add_note(f"the batch's jobs: {','.join(ids)}")
            self._settle_all(messages, ack=False)
            raise
        finally:
            self.running, self.current = 0, []
        self._wait_stored()  # the batch before this one
        end = time.monotonic()
        idle = arrived is None or arrived > self.cycle_end  # nothing waited for this worker
        seconds = end - (start if idle else self.cycle_end)
        self.cycle_end = end
        self.rate.add(result.images, seconds)
        self.unit_rate.add(sum(c.record.units for c in result.claims), seconds)
        # Held by the storing thread from here: the heartbeat never loses sight of these tags.
        self.storing = messages
        self.stored = self.store_thread.submit(self._store, result, messages)

    def _store(self, result: BatchResult, messages: Sequence[Message]) -> None:
        """Store a run batch and settle its messages (in the storing thread)."""
        assert self.ctx is not None
        try:
            store_batch(self.ctx, result)
        except Exception:
            # Ledger or store unreachable for longer than the patience: the messages come back
            # and the ledger decides.
            log.exception(
                "storing the batch of jobs %s failed; their messages go back",
                ",".join(c.job_id for c in result.claims),
            )
            self._settle_all(messages, ack=False)
        else:
            self._settle_all(messages, ack=True)
        finally:
            self.storing = []

    def _wait_stored(self) -> None:
        """Block until the batch being stored is stored and settled."""
        if self.stored is not None:
            stored, self.stored = self.stored, None
            stored.result()

    def _settle_all(self, messages: Sequence[Message], *, ack: bool) -> None:
        for message in messages:
            self._settle(message, ack=ack)

    def _settle(self, message: Message, *, ack: bool) -> None:
        """Ack or requeue; once draining, Celery's loop no longer runs, so settle directly."""
        if self.stopping.is_set():
            (message.ack_now if ack else message.requeue_now)()
        else:
            (message.ack_soon if ack else message.requeue_soon)()

    def _ordered(self, held: dict[str, int] | None = None) -> list[Pending[Message]]:
        """The jobs held here in the order to take them (under self.cond): under fair dispatch
        `fair_order`'s (`held`: jobs running here by tenant), else arrival."""
        if self.fair:
            return fair_order(self.pending, held)
        return sorted(self.pending, key=lambda p: p.arrived)

    def _more_coming(self) -> bool:
        """True while the broker holds messages this worker could still receive."""
        if len(self.pending) + len(self.inbox) >= self.prefetch:
            return False
        return broker.waiting(self.redis, [self.queue]) > 0

    def _hydrate(self) -> None:
        """Read the jobs of newly received messages; settle those that need no run."""
        with self.cond:
            inbox, self.inbox = self.inbox, []
        if not inbox:
            return
        try:
            records = self.store.get_many([job_id for job_id, _, _ in inbox])
        except BaseException:
            with self.cond:  # nothing received is ever forgotten: read them next time
                self.inbox[:0] = inbox
            raise
        fresh = []
        for (job_id, message, arrived), record in zip(inbox, records, strict=True):
            if isinstance(record, Unreadable):
                self._quarantine(job_id, record.reason, message)
                continue
            if record is None or not _dispatched(record) or job_id in self.records:
                log.info(
                    "job %s is %s; message settled without a run",
                    job_id,
                    record.status.value if record else "gone",
                )
                self._settle(message, ack=True)
                continue
            self.records[job_id] = record
            bucket = Bucket.of(record.request, record.model)
            rank = keys.CLASSES.index(record.request.priority)
            rows = record.request.num_images
            fresh.append(Pending(job_id, bucket, rows, arrived, message, record.tenant, rank))
        with self.cond:
            self.pending.extend(fresh)

    def _quarantine(self, job_id: str, reason: str, message: Message) -> None:
        log.error("job %s: its record cannot be read (%s); it is set aside", job_id, reason)
        self.store.quarantine(job_id)
        self._settle(message, ack=True)

    # --- heartbeat ---------------------------------------------------------------------------

    def _beat_loop(self) -> None:
        while True:
            try:
                self.beat()
                self._watch_loop()
                self._watch_canceled_call()
                if self.supervision.sweep is not None and self.ctx is not None:
                    self.supervision.sweep()
            except RedisError as e:
                log.warning("heartbeat failed: %s", e)
            except Exception:
                log.exception("heartbeat failed; beating on")
            if self.silenced.wait(self.heartbeat_s):
                return

    def _watch_loop(self) -> None:
        """Exit when the work loop has not moved for `loop_stale_s` (a wedged call, a deadlock).

        The leases of its jobs then run out and the sweep hands them back; staying, this thread
        would renew them for as long as the process lives. A process that was frozen as a whole
        (SIGSTOP, a paused VM) froze this thread too: that is not a stuck loop, so look again.
        """
        now = time.time()
        looked_at, self.looked_at = self.looked_at, now
        ctx, loop_at, stale_s = self.ctx, self.loop_at, self.supervision.loop_stale_s
        if ctx is None or loop_at is None or self.stopping.is_set() or looked_at is None:
            return
        if now - looked_at > stale_s / 2 or now - loop_at <= stale_s:
            return
        ids = ",".join(c.job_id for c in ctx.calling) or "none"
        self.fatal(
            EXIT_LOOP_FAILED,
            f"the work loop has not moved for {now - loop_at:.0f} s; the jobs of its call: {ids}",
        )

    def _watch_canceled_call(self) -> None:
        """Abandon a call whose rows were all canceled and that has stopped moving.

        A call still taking steps is interrupted at its next step by its progress callback;
        only one stuck in a step (one step of a huge job can take minutes) for longer than the
        grace since the cancel was seen, and since its last step, is abandoned.
        """
        ctx = self.ctx
        if ctx is None or not ctx.calling or ctx.calling_since is None:
            return
        calling = ctx.calling
        if any(c.live for c in calling):
            return
        since = getattr(self, "_dead_call", None)
        if since is None or since[0] is not calling:
            self._dead_call = (calling, time.monotonic())
            return
        grace = self.supervision.cancel_grace_s
        stepped_ago = time.time() - (self.loop_at or 0.0)
        if time.monotonic() - since[1] >= grace and stepped_ago >= grace:
            ids = ",".join(c.job_id for c in calling)
            self.fatal(EXIT_ABANDONED, f"every row of the call ({ids}) was canceled; not waiting")

    def ahead(self) -> int:
        """Jobs this worker wants dispatched ahead of it: the next batch, formed while one runs.

        Its broker prefetch holds the running batch's messages too (they are acked only once
        stored), so a window of the whole prefetch would park a batch's worth of jobs in the
        broker where no worker can take them, and a tenant arriving later would wait behind them.
        """
        return max(1, self.prefetch - self.limits.max_rows)

    def _working(self) -> tuple[list[Message], int]:
        """The messages of the jobs being run or stored, and the rows running."""
        return [*self.current, *self.storing], self.running

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
        """Renew the leases of running jobs, publish this worker's state, feed its window."""
        ctx = self.ctx
        if ctx is not None:
            renew(ctx, list(ctx.running.values()))
            overdue(ctx, list(ctx.running.values()))  # a hung call's rows too
        with self.cond:
            buffered = len(self.pending) + len(self.inbox)
            held = [d.tag for _, d, _ in self.inbox] + [p.handle.tag for p in self.pending]
            jobs = [j for j, _, _ in self.inbox] + [p.job_id for p in self.pending]
        working, running = self._working()
        held += [d.tag for d in working]
        jobs += list(ctx.running) if ctx is not None else []
        beat = WorkerBeat(
            name=self.name,
            state=self.current_state(bool(buffered or working)),
            images_per_s=self.rate.value,
            units_per_s=self.unit_rate.value,
            buffered=buffered,
            running=running,
            pid=os.getpid(),
            started_at=self.started_at,
            idle_since=self.idle_since,
            at=time.time(),
            held=held,
            jobs=jobs,
            model=self.model,
            prefetch=self.ahead() if ctx is not None and not self.stopping.is_set() else 0,
            loop_at=self.loop_at,
        )
        heartbeats.publish(self.redis, beat)
        if ctx is not None and not self.stopping.is_set():
            self.store.dispatch(self.model)  # a worker that came up, or has room, is fed now


def _dispatched(record: JobRecord) -> bool:
    """A job a worker may claim: queued and dispatched (a stale message's job is neither)."""
    return record.status is JobStatus.QUEUED and record.dispatched_at is not None
