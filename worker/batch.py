"""Running one batch: claim its jobs in the ledger, call the pipeline, store images, finish jobs."""

from __future__ import annotations

import io
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from PIL.Image import Image

from core.errors import StorageError
from core.jobs import Bucket, ErrorInfo, JobStatus, Metrics, Progress, StoredImage
from core.storage import CONTENT_TYPES, ObjectStore, image_key, put_with_retries
from core.store import JobRecord, JobStore
from worker.inference import Row, StepHook

log = logging.getLogger(__name__)

PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


class Generator(Protocol):
    """What makes images (the Engine, or anything shaped like it in tests)."""

    def generate(self, rows: Sequence[Row], bucket: Bucket, on_step: StepHook) -> list[Image]:
        """Images for `rows`, one per row."""


@dataclass(frozen=True)
class CallInfo:
    """One pipeline call, as its jobs' metrics record it."""

    batch_id: str
    rows: int
    done_at: float | None = None  # epoch seconds when the pipeline call returned


@dataclass
class Claim:
    """A job this worker's attempt holds."""

    record: JobRecord
    attempt: int
    claimed_at: float
    live: bool = True

    @property
    def job_id(self) -> str:
        """The job's id."""
        return self.record.id

    def rows(self) -> list[Row]:
        """The images the job asks for, seeds seed, seed+1, …"""
        req = self.record.request
        seed = req.seed or 0
        return [
            Row(self.job_id, i, req.prompt, req.negative_prompt, seed + i)
            for i in range(req.num_images)
        ]


@dataclass
class BatchContext:
    """What a batch needs from its worker."""

    store: JobStore
    storage: ObjectStore
    engine: Generator
    worker: str
    lease_s: float
    progress_interval_s: float
    prefix: str = ""
    running: dict[str, Claim] = field(default_factory=dict)  # for the heartbeat's lease renewal


def claim(ctx: BatchContext, records: Sequence[JobRecord]) -> list[Claim]:
    """Move each job queued → running under a new attempt; skip those that left the queue."""
    claims = []
    now = time.time()
    for record in records:
        attempt = record.attempt + 1
        taken = ctx.store.try_transition(
            record.id,
            JobStatus.RUNNING,
            expect_attempt=record.attempt,
            score=now + ctx.lease_s,
            attempt=attempt,
            started_at=now,
            worker=ctx.worker,
            progress=Progress(step=0, total_steps=record.request.steps),
        )
        if taken:
            claims.append(Claim(record, attempt, now))
        else:
            log.info("job %s left the queue before it ran; skipping", record.id)
    return claims


class Progressor:
    """Writes throttled progress for a call's jobs and notices rows canceled meanwhile."""

    def __init__(self, ctx: BatchContext, claims: Sequence[Claim], total: int) -> None:
        self.ctx, self.claims, self.total = ctx, claims, total
        self.last = time.monotonic()

    def __call__(self, step: int) -> bool:
        """Report `step`; answer whether any row of the call is still wanted."""
        now = time.monotonic()
        if now - self.last >= self.ctx.progress_interval_s or step == self.total:
            self.last = now
            for c in self.claims:
                if c.live:
                    c.live = self.ctx.store.try_transition(
                        c.job_id,
                        JobStatus.RUNNING,
                        expect_attempt=c.attempt,
                        score=time.time() + self.ctx.lease_s,
                        progress=Progress(step=step, total_steps=self.total),
                    )
        wanted = any(c.live for c in self.claims)
        if not wanted:
            log.info("every row of the batch was canceled; interrupting the pipeline")
        return wanted


def encode(image: Image, fmt: str) -> bytes:
    """An image as bytes of the requested format."""
    buf = io.BytesIO()
    image.save(buf, format=PIL_FORMATS[fmt])
    return buf.getvalue()


def fail(ctx: BatchContext, claim_: Claim, code: str, message: str) -> None:
    """Mark a job failed with a short public reason (a stale attempt's write is refused)."""
    ctx.store.try_transition(
        claim_.job_id,
        JobStatus.FAILED,
        expect_attempt=claim_.attempt,
        finished_at=time.time(),
        error=ErrorInfo(code=code, message=message),
    )


def finish(
    ctx: BatchContext, claim_: Claim, images: Sequence[Image], run_s: float, call: CallInfo
) -> None:
    """Store a job's images at deterministic keys and mark it succeeded."""
    if ctx.store.statuses([claim_.job_id])[0] is not JobStatus.RUNNING:
        log.info("job %s was canceled while running; its images are discarded", claim_.job_id)
        return
    req = claim_.record.request
    outputs = []
    for row, image in zip(claim_.rows(), images, strict=True):
        key = image_key(ctx.prefix, claim_.job_id, row.index, req.output_format)
        put_with_retries(
            ctx.storage, key, encode(image, req.output_format), CONTENT_TYPES[req.output_format]
        )
        outputs.append(StoredImage(key=key, seed=row.seed, width=image.width, height=image.height))
    now = time.time()
    ctx.store.try_transition(
        claim_.job_id,
        JobStatus.SUCCEEDED,
        expect_attempt=claim_.attempt,
        finished_at=now,
        outputs=outputs,
        progress=Progress(step=req.steps, total_steps=req.steps),
        metrics=Metrics(
            queue_s=round(claim_.claimed_at - claim_.record.created_at, 4),
            run_s=round(run_s, 4),
            batch_size=call.rows,
            batch_id=call.batch_id,
            model_done_at=None if call.done_at is None else round(call.done_at, 4),
            attempts=claim_.attempt,
        ),
    )


def run_claims(ctx: BatchContext, claims: Sequence[Claim], bucket: Bucket) -> int:
    """One pipeline call for these claims; on error, each job again alone. Returns images made."""
    rows = [row for c in claims for row in c.rows()]
    start = time.monotonic()
    try:
        images = ctx.engine.generate(rows, bucket, Progressor(ctx, claims, bucket.steps))
    except Exception as e:
        if len(claims) > 1:
            log.warning("batch of %d jobs raised (%s); retrying each job alone", len(claims), e)
            return sum(run_claims(ctx, [c], bucket) for c in claims)
        log.exception("job %s failed in the pipeline", claims[0].job_id)
        fail(ctx, claims[0], "pipeline_error", f"the model could not run this job: {e}")
        return 0
    run_s = time.monotonic() - start
    call = CallInfo(batch_id=uuid.uuid4().hex[:12], rows=len(rows), done_at=time.time())
    offset = 0
    for c in claims:
        n = c.record.request.num_images
        if c.live:
            store_or_fail(ctx, c, images[offset : offset + n], run_s, call)
        offset += n
    return len(rows)


def store_or_fail(
    ctx: BatchContext, claim_: Claim, images: Sequence[Image], run_s: float, call: CallInfo
) -> None:
    """Finish a job, failing it with a storage error when the store gives up."""
    try:
        finish(ctx, claim_, images, run_s, call)
    except StorageError as e:
        log.error("job %s: %s", claim_.job_id, e)
        fail(ctx, claim_, "storage_error", "the image could not be stored; retry the job")


def run_batch(
    ctx: BatchContext, records: Sequence[JobRecord], bucket: Bucket, capacity: int
) -> int:
    """Claim, run (split to the row cap), finish. Returns images made."""
    claims = claim(ctx, records)
    for c in claims:
        ctx.running[c.job_id] = c
    try:
        made = 0
        for group in split(claims, capacity):
            made += run_claims(ctx, group, bucket)
        return made
    finally:
        for c in claims:
            ctx.running.pop(c.job_id, None)


def split(claims: Sequence[Claim], max_rows: int) -> list[list[Claim]]:
    """Groups of whole jobs of at most `max_rows` rows (a larger job runs alone)."""
    groups: list[list[Claim]] = [[]]
    rows = 0
    for c in claims:
        n = c.record.request.num_images
        if groups[-1] and rows + n > max_rows:
            groups.append([])
            rows = 0
        groups[-1].append(c)
        rows += n
    return [g for g in groups if g]
