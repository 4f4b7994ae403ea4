"""`DQ_ENGINE=step`: a worker whose jobs join the step engine's running loop at the next step.

`StepRunner` is the batch runner with another middle. Receiving messages, reading records,
quarantine, the heartbeat (leases, deadlines, the stale-loop watch), drains and fatal exits are
the runner's; but instead of forming batches, its loop thread claims each job as soon as its
record is read and submits it to the `StepEngine` (worker/steps.py), whose denoising loop it
joins at the next step boundary. The engine reports on its own thread to this runner, its
`Listener`: progress is written (best effort), and each job's end (images stored and the job
finished, failed alone, or canceled) is recorded on the storing thread before its message is acked.

Jobs with LoRAs run in the engine too, through the worker's own LoRA support (`worker.loras`,
shared between the engine's threads by `StepAdapters`); a LoRA that cannot be loaded fails its
job alone. A job the step engine refuses (an image task its family does not run, a job for
another model or task, LoRAs on an engine without LoRA support) runs in batches in the same
worker, once the engine has emptied: the two never use the pipeline at once. A model the step
engine does not know at all (not SD 1.x/2.x or SDXL) is served in batches throughout.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from PIL.Image import Image
from redis.exceptions import RedisError

from core import metrics
from core.catalog import Defaults
from core.errors import ValidationFailed
from core.jobs import Bucket, Progress
from core.store import Change
from worker.admission import Priority
from worker.batch import fail, failure_code, finish, release, run_claimed, with_inputs
from worker.batcher import Pending
from worker.claims import BatchContext, CallInfo, Claim, claim, overdue, renew_each
from worker.families import StepUnsupported
from worker.inference import paste_back
from worker.loras import Adapters, StepAdapters
from worker.reports import StepReport
from worker.runner import Message, Runner
from worker.steps import LoopSettings, StepEngine
from worker.tracks import StepJob

log = logging.getLogger(__name__)


@dataclass
class Stepping:
    """A job in the step engine: its claim, its message, and when it went in."""

    claim: Claim
    message: Message
    submitted_at: float  # epoch seconds
    leaving: bool = False  # told to leave the engine (canceled, failed, taken from this attempt)


class StepRunner(Runner):
    """The runner whose jobs run in a `StepEngine`; batches only for what the engine refuses."""

    def __init__(self, *args: Any, loop: LoopSettings | None = None, **kwargs: Any) -> None:
        """The runner's arguments, and the step loop's budget."""
        super().__init__(*args, **kwargs)
        self.loop = loop or LoopSettings()
        self.engine: StepEngine | None = None  # None: serving in batches
        self.stepping: dict[str, Stepping] = {}  # under self.cond
        self.refused: list[tuple[Claim, Message]] = []  # claimed, for batches (loop thread)
        self.strength = Defaults().strength  # an image job's strength when it names none
        self.tasks: tuple[str, ...] | None = None  # the catalog's tasks for the model (None: any)
        self.submitted_at: float | None = None  # monotonic: the last job given to the engine
        self.progress_at = 0.0  # monotonic: the last progress written
        self.made: tuple[int, float] = (0, 0.0)  # images and units since the rates were fed
        self.made_since = time.monotonic()
        self.counted: dict[int, int] = {}  # the loop's calls by row count, in dq_step_rows so far

    # --- starting ----------------------------------------------------------------------------

    def _started(self) -> None:
        """Start the step engine over the loaded pipeline; serve in batches if it cannot run it."""
        ctx = self.ctx
        assert ctx is not None
        spec = getattr(ctx.engine, "spec", None)
        if spec is not None:
            self.strength, self.tasks = spec.defaults.strength, spec.tasks
        pipe = getattr(ctx.engine, "pipe", None)
        adapters = getattr(ctx.engine, "adapters", None)  # None: the model takes no LoRAs
        shared = StepAdapters(adapters) if isinstance(adapters, Adapters) else None
        try:
            if pipe is None:
                raise StepUnsupported(f"{type(ctx.engine).__name__} has no diffusers pipeline")
            engine = StepEngine(pipe, self, model=self.model, settings=self.loop, adapters=shared)
            self.engine = engine.start()
        except StepUnsupported as e:
            log.warning("DQ_ENGINE=step: %s; this worker serves in batches", e.message)
            return
        log.info("worker %s runs its jobs in the step engine", self.name)

    # --- the loop thread ---------------------------------------------------------------------

    def _step(self) -> None:
        if self.engine is None:
            super()._step()
            return
        self._hydrate()
        if self.refused:
            self._run_refused()
            return
        room = self.engine.wants()  # outside self.cond: the engine's lock is never taken inside
        with self.cond:
            held = Counter(s.claim.record.tenant for s in self.stepping.values())
            order = self._ordered(held)
            fresh, self.pending = order[:room], order[room:]
            if not fresh:
                if not self.inbox:
                    # Woken by a message, or by the engine's progress (a step moved the line).
                    self.cond.wait(timeout=0.2 if self.pending else 1.0)
                return
        self._enter(fresh)

    def _stamp(self) -> None:
        """The work loop moved: now while the engine has nothing to run, else its last step."""
        engine = self.engine
        if engine is None or not engine.open_jobs():
            super()._stamp()
            return
        moved = [t for t in (engine.snapshot().last_step_at, self.submitted_at) if t is not None]
        self.loop_at = time.time() - (time.monotonic() - max(moved))

    def _enter(self, fresh: list[Pending[Message]]) -> None:
        """Claim newly read jobs, load their inputs and submit them to the engine."""
        ctx = self.ctx
        assert ctx is not None
        records = [self.records.pop(p.job_id) for p in fresh]
        messages = {p.job_id: p.handle for p in fresh}
        try:
            claims = with_inputs(ctx, claim(ctx, records))
        except BaseException as e:
            # The ledger is away: the messages go back, and the ledger decides what runs.
            e.add_note(f"the jobs: {','.join(messages)}")
            self._settle_all(list(messages.values()), ack=False)
            raise
        for c in claims:
            self._submit(c, messages.pop(c.job_id))
        self._settle_all(list(messages.values()), ack=True)  # gone, or failed on their inputs

    def _submit(self, c: Claim, message: Message) -> None:
        """One claimed job into the engine; one it refuses waits for batches."""
        ctx, engine = self.ctx, self.engine
        assert ctx is not None
        assert engine is not None
        ctx.running[c.job_id] = c  # the heartbeat renews its lease from now on
        with self.cond:  # before the engine can report on it
            self.stepping[c.job_id] = Stepping(c, message, time.time())
        try:
            engine.submit(self._job(c))
        except (StepUnsupported, ValidationFailed) as e:
            with self.cond:
                del self.stepping[c.job_id]
            if isinstance(e, StepUnsupported):
                log.info("job %s runs in batches: %s", c.job_id, e.message)
                self.refused.append((c, message))
                return
            release(ctx, [c])
            fail(ctx, c, e.code, e.message)
            self._settle(message, ack=True)
            return
        self.submitted_at = time.monotonic()

    def _job(self, c: Claim) -> StepJob:
        """A claimed job as the step engine takes it (StepUnsupported: one the batch engine
        refuses, so that it says why)."""
        req = c.record.request
        model = c.record.model
        if (model and model != self.model) or (self.tasks and req.task not in self.tasks):
            raise StepUnsupported(f"{req.task} on {model or 'this model'} is not this worker's")
        strength = req.strength
        if req.image is not None and strength is None:
            strength = self.strength  # the model's default, as the batch engine takes it
        return StepJob(
            c.job_id,
            req.prompt,
            negative_prompt=req.negative_prompt,
            width=req.width,
            height=req.height,
            steps=req.steps,
            guidance_scale=req.guidance_scale,
            seed=req.seed or 0,
            num_images=req.num_images,
            scheduler=req.scheduler,
            priority=Priority[req.priority.upper()],
            loras=Bucket.of(req).loras,
            image=c.inputs.image,
            mask=c.inputs.mask,
            strength=strength,
        )

    def _run_refused(self) -> None:
        """Run the jobs the engine refused, in batches, once it has emptied (it takes nothing
        new meanwhile): the pipeline is never used by both at once. LoRAs a batch leaves on
        need not go off: the engine makes each call's set active itself (`StepAdapters`)."""
        assert self.engine is not None
        if self.engine.open_jobs():
            with self.cond:
                self.cond.wait(timeout=0.1)  # a job's end wakes it sooner
            return
        while self.refused:  # a bucket at a time; what a failure leaves waits for next time
            bucket = _bucket(self.refused[0][0])
            group = [(c, d) for c, d in self.refused if _bucket(c) == bucket]
            self.refused = [(c, d) for c, d in self.refused if _bucket(c) != bucket]
            self._run_group(bucket, group)

    def _run_group(self, bucket: Bucket, group: list[tuple[Claim, Message]]) -> None:
        """One bucket's refused jobs through the pipeline, stored as a batch."""
        ctx = self.ctx
        assert ctx is not None
        claims = [c for c, _ in group]
        capacity = self.limits.capacity(bucket)
        ids = [c.job_id for c in claims]
        self._call([d for _, d in group], ids, lambda: run_claimed(ctx, claims, bucket, capacity))

    # --- the engine's listener (called on its reporter thread) -------------------------------

    def on_progress(self, reports: Sequence[StepReport]) -> None:
        """Write the jobs' progress with their leases (throttled, best effort); a step moved
        the engine's line, so the loop thread looks again at what it may hand in."""
        ctx = self.ctx
        assert ctx is not None
        with self.cond:
            self.cond.notify_all()
        now = time.monotonic()
        last = any(r.done >= r.total for r in reports)
        if now - self.progress_at < ctx.progress_interval_s and not last:
            return
        self.progress_at = now
        with self.cond:
            held = [
                (self.stepping[r.job_id].claim, r) for r in reports if r.job_id in self.stepping
            ]
        try:
            renew_each(
                ctx,
                [(c, {"progress": Progress(step=r.step, total_steps=r.steps)}) for c, r in held],
            )
            overdue(ctx, [c for c, _ in held])
        except RedisError as e:
            # The heartbeat keeps the leases once Redis is back.
            log.warning("progress not written (Redis: %s); the jobs go on", e)
        self._let_go()

    def on_done(self, job_id: str, images: list[Image]) -> None:
        """Store the images and finish the job (on the storing thread)."""
        done_at = time.time()
        self._later(job_id, lambda entry: self._succeeded(entry, images, done_at))

    def on_failed(self, job_id: str, error: Exception) -> None:
        """Fail the job alone (on the storing thread)."""
        code, message = failure_code(error), f"the model could not run this job: {error}"
        self._later(job_id, lambda entry: fail(self._ctx(), entry.claim, code, message))

    def on_canceled(self, job_id: str) -> None:
        """The job left with no images: the ledger already holds why."""
        self._later(job_id, None)

    def _ctx(self) -> BatchContext:
        assert self.ctx is not None
        return self.ctx

    def _later(self, job_id: str, record: Callable[[Stepping], object] | None) -> None:
        """Record a job's end on the storing thread, then settle its message."""
        with self.cond:
            entry = self.stepping.get(job_id)
        if entry is None:
            log.warning("the step engine ended job %s, which this worker does not hold", job_id)
            return
        self.store_thread.submit(self._close, entry, record)

    def _close(self, entry: Stepping, record: Callable[[Stepping], object] | None) -> None:
        """Record the end (unless the job is no longer this attempt's), let go, settle."""
        ack = True
        try:
            if record is not None and entry.claim.live:
                record(entry)
        except Exception:
            # The ledger or the store stayed away past the patience: the message comes back,
            # and the ledger decides.
            log.exception(
                "recording job %s's end failed; its message goes back", entry.claim.job_id
            )
            ack = False
        finally:
            release(self._ctx(), [entry.claim])
            with self.cond:
                self.stepping.pop(entry.claim.job_id, None)
                self.cond.notify_all()
        self._settle(entry.message, ack=ack)

    def _succeeded(self, entry: Stepping, images: list[Image], done_at: float) -> None:
        """Store a job's images and mark it succeeded."""
        c, ctx = entry.claim, self._ctx()
        req = c.record.request
        if req.task == "inpaint":  # outside the mask, the input's own pixels, as in batches
            bucket = Bucket.of(req, c.record.model)
            images = [paste_back(im, row, bucket) for im, row in zip(images, c.rows(), strict=True)]
        # To the ledger each job is a call of its own (its id, its images).
        call = CallInfo(batch_id=f"step-{uuid.uuid4().hex[:12]}", rows=len(images), done_at=done_at)
        finish(ctx, [c], [images], done_at - entry.submitted_at, call)
        with self.cond:
            made, units = self.made
            self.made = (made + len(images), units + c.record.units)

    # --- the heartbeat thread ----------------------------------------------------------------

    def beat(self) -> None:
        """The runner's beat (leases, deadlines), the engine's rates, then cancels applied."""
        self._feed_rates()
        self._count_rows()
        super().beat()
        self._let_go()

    def _let_go(self) -> None:
        """Jobs that are no longer this attempt's (canceled, failed, taken) leave the engine."""
        engine = self.engine
        if engine is None:
            return
        with self.cond:
            leaving = [e for e in self.stepping.values() if not e.claim.live and not e.leaving]
            for entry in leaving:
                entry.leaving = True
        for entry in leaving:
            log.info("job %s leaves the step engine", entry.claim.job_id)
            engine.cancel(entry.claim.job_id)

    def _feed_rates(self) -> None:
        """Fold the images made since the last beat that saw any into the heartbeat's rates."""
        now = time.monotonic()
        with self.cond:
            (images, units), self.made = self.made, (0, 0.0)
            idle = not self.stepping
        if images:
            self.rate.add(images, now - self.made_since)
            self.unit_rate.add(units, now - self.made_since)
        if images or idle:
            self.made_since = now

    def _count_rows(self) -> None:
        """The loop's denoiser calls since the last beat, into the `dq_step_rows` histogram."""
        engine = self.engine
        if engine is None:
            return
        calls = {rows: n for rows, (n, _) in engine.snapshot().by_rows.items()}
        new = {rows: n - self.counted.get(rows, 0) for rows, n in calls.items()}
        if not any(n > 0 for n in new.values()):
            return
        pipe = self.redis.pipeline(transaction=False)
        for rows, n in new.items():
            if n > 0:
                metrics.observe(pipe, "step_rows", self.model, rows, n)
        try:
            pipe.execute()
        except RedisError as e:
            log.warning("step loop metrics not written (Redis: %s); the next beat adds them", e)
            return
        self.counted = calls

    def ahead(self) -> int:
        """Jobs to dispatch ahead of this worker: the line it keeps in its engine
        (`StepEngine.line`). More would wait here, claimed or not, in arrival order."""
        engine = self.engine
        if engine is None:
            return super().ahead()
        return engine.line()

    def _working(self) -> tuple[list[Message], int]:
        """The batch runner's, plus the jobs in the engine and those waiting for batches."""
        held, running = super()._working()
        with self.cond:
            stepping = [e.message for e in self.stepping.values()]
        refused = [d for _, d in list(self.refused)]
        return [*held, *stepping, *refused], running + len(stepping)

    # --- draining ----------------------------------------------------------------------------

    def _finish_work(self, timeout: float) -> None:
        """The engine finishes what started; claimed jobs that never started go back."""
        super()._finish_work(timeout)
        engine = self.engine
        if engine is None:
            return
        drained = engine.drain(timeout)
        with self.cond:
            back = [self.stepping.pop(j) for j in drained.returned if j in self.stepping]
            left = [self.stepping[j] for j in drained.unfinished if j in self.stepping]
        self._return([(e.claim, e.message) for e in back] + self.refused)
        self.refused = []
        self.store_thread.submit(lambda: None).result()  # every end reported is recorded
        engine.close()
        for entry in left:  # the lease runs out and the recovery sweep hands the job back
            log.warning("job %s was still running at the drain's timeout", entry.claim.job_id)
            self._settle(entry.message, ack=False)
        log.info("step engine drained: %d job(s) handed back, %d unfinished", len(back), len(left))

    def _return(self, claimed: list[tuple[Claim, Message]]) -> None:
        """Claimed jobs that never ran go back to the front of their lines; messages acked."""
        ctx = self._ctx()
        for c, message in claimed:
            release(ctx, [c])
            try:
                self.store.change(
                    Change("handback", c.job_id, attempt=c.attempt, worker=ctx.worker)
                )
                message.ack_now()
            except RedisError:
                message.requeue_now()  # the lease runs out and the sweep hands the job back


def _bucket(c: Claim) -> Bucket:
    """The batch a claimed job belongs to."""
    return Bucket.of(c.record.request, c.record.model)
