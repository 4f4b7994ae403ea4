"""Running one batch: claim its jobs in the ledger, call the pipeline, store images, finish jobs.

The pipeline half (`run_models`) and the storing half (`store_batch`) are apart so that a worker
can store one batch's images while its pipeline runs the next.
"""

from __future__ import annotations

import io
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from PIL.Image import Image

from core.errors import StorageError
from core.jobs import Bucket, JobStatus, Metrics, Progress, StoredImage
from core.records import JobRecord
from core.storage import CONTENT_TYPES, image_key, job_folder, put_with_retries
from core.store import Change
from worker.claims import (
    BatchContext,
    CallInfo,
    Claim,
    Progressor,
    claim,
    failed,
    patiently,
    refused,
)
from worker.inference import Row
from worker.inputs import InputRefused, prepare_inputs
from worker.loras import AdapterError
from worker.spans import Call, count_calls, job_spans

log = logging.getLogger(__name__)

PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def encode(image: Image, fmt: str) -> bytes:
    """An image as bytes of the requested format."""
    buf = io.BytesIO()
    image.save(buf, format=PIL_FORMATS[fmt])
    return buf.getvalue()


def fail(ctx: BatchContext, claim_: Claim, code: str, message: str) -> None:
    """Mark a job failed (a stale attempt's write is refused), waiting out a ledger outage."""
    change = failed(ctx, claim_, code, message)
    applied = patiently(ctx, f"failing job {claim_.job_id}", lambda: ctx.store.change(change))
    if not applied.ok:
        refused(claim_, applied)
    else:
        traced(ctx, claim_, change, None)


def store_images(ctx: BatchContext, claim_: Claim, images: Sequence[Image]) -> list[StoredImage]:
    """Put a job's images at their deterministic keys (retried; StorageError when it gives up)."""
    req = claim_.record.request
    outputs = []
    for row, image in zip(claim_.rows(), images, strict=True):
        key = image_key(ctx.prefix, claim_.job_id, row.index, req.output_format)
        put_with_retries(
            ctx.storage, key, encode(image, req.output_format), CONTENT_TYPES[req.output_format]
        )
        outputs.append(StoredImage(key=key, seed=row.seed, width=image.width, height=image.height))
    return outputs


def discard(ctx: BatchContext, change: Change) -> None:
    """Remove the images just stored for a job that was canceled while they were stored."""
    if not change.fields.get("outputs"):
        return
    try:
        ctx.storage.delete_folder(job_folder(ctx.prefix, change.job_id))
        log.info("job %s: its images, stored as it was canceled, removed", change.job_id)
    except Exception:  # the expiry sweep deletes them later anyway
        log.warning("job %s: could not remove the images of a canceled job", change.job_id)


def succeeded(
    ctx: BatchContext, claim_: Claim, outputs: list[StoredImage], run_s: float, call: CallInfo
) -> Change:
    """The change that marks a stored job succeeded, with its metrics."""
    req = claim_.record.request
    fields = {
        "finished_at": time.time(),
        "outputs": outputs,
        "progress": Progress(step=req.steps, total_steps=req.steps),
        "metrics": Metrics(
            queue_s=round(claim_.claimed_at - claim_.record.created_at, 4),
            run_s=round(run_s, 4),
            batch_size=call.rows,
            batch_id=call.batch_id,
            model_done_at=None if call.done_at is None else round(call.done_at, 4),
            attempts=claim_.attempt,
        ),
    }
    return Change(
        "finish",
        claim_.job_id,
        attempt=claim_.attempt,
        worker=ctx.worker,
        to=JobStatus.SUCCEEDED,
        fields=fields,
    )


def finish(
    ctx: BatchContext,
    claims: Sequence[Claim],
    images: Sequence[Sequence[Image]],
    run_s: float,
    call: CallInfo,
) -> None:
    """Store each still-running job's images and mark them succeeded (one ledger write for all).

    A job canceled meanwhile stores nothing; one whose images the store refuses fails alone.
    While the ledger is unreachable, the reads and writes wait for it (the images are made).
    """
    ids = [c.job_id for c in claims]
    statuses = patiently(ctx, "reading statuses", lambda: ctx.store.statuses(ids))
    done = []
    for claim_, made, status in zip(claims, images, statuses, strict=True):
        if status is not JobStatus.RUNNING:
            log.info("job %s was canceled while running; its images are discarded", claim_.job_id)
            continue
        try:
            done.append(succeeded(ctx, claim_, store_images(ctx, claim_, made), run_s, call))
        except StorageError as e:
            log.error("job %s: %s", claim_.job_id, e)
            done.append(failed(ctx, claim_, "storage_error", "the image could not be stored"))
    applied = patiently(ctx, "recording outcomes", lambda: ctx.store.apply(done))
    for change, outcome in zip(done, applied, strict=True):
        claim_ = next(c for c in claims if c.job_id == change.job_id)
        if not outcome.ok:
            refused(claim_, outcome)
            if outcome.before == JobStatus.CANCELED.value:  # canceled (or deleted) meanwhile
                discard(ctx, change)
        elif call.done_at is not None:
            pipeline = Call(call.batch_id, call.rows, call.done_at - run_s, call.done_at)
            traced(ctx, claim_, change, pipeline)


def traced(ctx: BatchContext, claim_: Claim, change: Change, call: Call | None) -> None:
    """Leave the ended attempt's spans in its job's trace (nothing unless tracing is on)."""
    attempt = (claim_.attempt, claim_.claimed_at, ctx.worker)
    job_spans(ctx.tracing, claim_.record, attempt, change.fields, call)


@dataclass
class CallOutput:
    """The images of one pipeline call, each job's share, waiting to be stored."""

    claims: list[Claim]
    images: list[list[Image]]
    run_s: float
    call: CallInfo


@dataclass
class BatchResult:
    """A batch whose pipeline calls are done; its images are stored by `store_batch`."""

    claims: list[Claim]
    calls: list[CallOutput]

    @property
    def images(self) -> int:
        """Images the pipeline made."""
        return sum(m.call.rows for m in self.calls)


def failure_code(error: BaseException) -> str:
    """The error code of a job the model could not run: `lora_failed` when a LoRA it names could
    not be put to use, else `pipeline_error`."""
    return error.code if isinstance(error, AdapterError) else "pipeline_error"


def run_claims(
    ctx: BatchContext, claims: Sequence[Claim], bucket: Bucket, capacity: int
) -> list[CallOutput]:
    """One pipeline call for these claims (a job larger than `capacity` rows in several, one
    after another, so a call never holds more pixels than the budget); on error, each job again
    alone.
    """
    rows = [row for c in claims for row in c.rows()]
    start = time.monotonic()
    try:
        images = [
            image for part in chunks(rows, capacity) for image in call(ctx, claims, part, bucket)
        ]
    except Exception as e:
        if len(claims) > 1:
            log.warning("batch of jobs %s raised (%s); retrying each job alone", _ids(claims), e)
            return [made for c in claims for made in run_claims(ctx, [c], bucket, capacity)]
        log.exception("job %s failed in the pipeline", claims[0].job_id)
        fail(ctx, claims[0], failure_code(e), f"the model could not run this job: {e}")
        return []
    run_s = time.monotonic() - start
    log.info("ran batch of jobs %s: %d image(s) in %.2f s", _ids(claims), len(rows), run_s)
    call_info = CallInfo(
        batch_id=uuid.uuid4().hex[:12], rows=len(rows), done_at=time.time(), capacity=capacity
    )
    per_job: list[list[Image]] = []
    offset = 0
    for c in claims:
        n = c.record.request.num_images
        per_job.append(images[offset : offset + n])
        offset += n
    return [CallOutput(list(claims), per_job, run_s, call_info)]


def call(
    ctx: BatchContext, claims: Sequence[Claim], rows: Sequence[Row], bucket: Bucket
) -> list[Image]:
    """One pipeline call; the heartbeat can see which claims it serves, and since when."""
    ctx.calling, ctx.calling_since = list(claims), time.monotonic()
    try:
        return ctx.engine.generate(rows, bucket, Progressor(ctx, claims, bucket.steps))
    finally:
        ctx.calling, ctx.calling_since = [], None


def chunks(rows: Sequence[Row], size: int) -> list[list[Row]]:
    """Rows in consecutive groups of at most `size`."""
    return [list(rows[i : i + size]) for i in range(0, len(rows), max(1, size))]


def _ids(claims: Sequence[Claim]) -> str:
    return ",".join(c.job_id for c in claims)


def with_inputs(ctx: BatchContext, claims: Sequence[Claim]) -> list[Claim]:
    """Load each claimed job's image inputs; a job whose inputs are refused fails alone."""
    ready = []
    for c in claims:
        req = c.record.request
        if req.image is None:
            ready.append(c)
            continue
        try:
            if ctx.inputs is None:
                raise InputRefused(
                    "this worker takes no image inputs", field="image", code="no_inputs"
                )
            refs, size = (req.image, req.mask), (req.width, req.height)
            c.inputs = prepare_inputs(ctx.inputs, ctx.storage, c.job_id, refs, size, ctx.resize)
        except InputRefused as e:
            log.info("job %s: input refused (%s)", c.job_id, e.code)
            fail(ctx, c, e.code, e.message)
            continue
        except StorageError as e:
            log.error("job %s: its inputs could not be stored: %s", c.job_id, e)
            fail(ctx, c, "storage_error", "the job's inputs could not be stored")
            continue
        ready.append(c)
    return ready


def run_models(
    ctx: BatchContext, records: Sequence[JobRecord], bucket: Bucket, capacity: int
) -> BatchResult:
    """Claim the jobs, load their inputs and run the pipeline (split to the row cap); storing
    comes after."""
    return run_claimed(ctx, with_inputs(ctx, claim(ctx, records)), bucket, capacity)


def run_claimed(
    ctx: BatchContext, claims: list[Claim], bucket: Bucket, capacity: int
) -> BatchResult:
    """Run jobs claimed with their inputs loaded (split to the row cap); storing comes after."""
    for c in claims:
        ctx.running[c.job_id] = c  # the heartbeat renews their leases until they are stored
    try:
        made = [
            m for group in split(claims, capacity) for m in run_claims(ctx, group, bucket, capacity)
        ]
    except BaseException:
        release(ctx, claims)
        raise
    return BatchResult(claims, made)


def store_batch(ctx: BatchContext, result: BatchResult) -> None:
    """Store a run batch's images and finish its jobs (a job canceled meanwhile stores nothing)."""
    try:
        for m in result.calls:
            count_calls(ctx.store.redis, m.claims[0].record.model, m.call.rows, m.call.capacity)
            live = [(c, images) for c, images in zip(m.claims, m.images, strict=True) if c.live]
            finish(ctx, [c for c, _ in live], [images for _, images in live], m.run_s, m.call)
    finally:
        release(ctx, result.claims)


def release(ctx: BatchContext, claims: Sequence[Claim]) -> None:
    """Stop renewing the leases of these claims."""
    for c in claims:
        ctx.running.pop(c.job_id, None)


def run_batch(
    ctx: BatchContext, records: Sequence[JobRecord], bucket: Bucket, capacity: int
) -> int:
    """Claim, run, store, finish, in one go. Returns images made.

    The runner calls the two halves itself, storing one batch while the next one runs.
    """
    result = run_models(ctx, records, bucket, capacity)
    store_batch(ctx, result)
    return result.images


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
