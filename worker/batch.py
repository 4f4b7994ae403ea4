"""Running one batch: claim its jobs in the ledger, call the pipeline, store images, finish jobs.

The pipeline half (`run_models`) and the storing half (`store_batch`) are apart so that a worker
can store one batch's images while its pipeline runs the next.
"""

from __future__ import annotations

import io
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from PIL.Image import Image
from redis.exceptions import RedisError

from core.catalog import Resize
from core.errors import StorageError
from core.jobs import Bucket, ErrorInfo, JobStatus, Metrics, Progress, StoredImage
from core.records import JobRecord
from core.storage import CONTENT_TYPES, ObjectStore, image_key, job_folder, put_with_retries
from core.store import Applied, Change, JobStore
from core.tracing import Tracing
from worker.inference import Row, StepHook
from worker.inputs import InputLoader, InputRefused, Inputs, prepare_inputs
from worker.spans import Call, count_calls, job_spans

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
    capacity: int = 0  # the most rows one call takes (the call was split beyond it)


@dataclass
class Claim:
    """A job this worker's attempt holds."""

    record: JobRecord
    attempt: int
    claimed_at: float
    live: bool = True
    inputs: Inputs = field(default_factory=Inputs)  # img2img and inpaint: decoded, fitted

    @property
    def job_id(self) -> str:
        """The job's id."""
        return self.record.id

    def rows(self) -> list[Row]:
        """The images the job asks for, seeds seed, seed+1, …"""
        req = self.record.request
        seed = req.seed or 0
        image, mask = self.inputs.image, self.inputs.mask
        return [
            Row(self.job_id, i, req.prompt, req.negative_prompt, seed + i, image, mask)
            for i in range(req.num_images)
        ]


def _no_step() -> None:
    """A loop stamp that records nothing (tests that run a batch alone)."""


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
    # How long the storing side keeps retrying ledger writes while Redis is unreachable.
    ledger_patience_s: float = 120.0
    running: dict[str, Claim] = field(default_factory=dict)  # for the heartbeat's lease renewal
    # The claims of the pipeline call in progress. Written by the batch thread only (a new list
    # each call); the heartbeat thread reads it to see whether a canceled call stopped in time.
    calling: list[Claim] = field(default_factory=list)
    calling_since: float | None = None  # monotonic start of that call
    on_step: Callable[[], None] = _no_step  # stamps the work loop's progress for the heartbeat
    max_run_s: float | None = None  # a job running longer fails (run_timeout); None: no limit
    inputs: InputLoader | None = None  # reads img2img and inpaint inputs (None: refuses them)
    resize: Resize = "cover"  # how an input is fitted to the job's size (the model's rule)
    tracing: Tracing = field(default_factory=Tracing)  # off unless OTEL_* asks for it


T = TypeVar("T")


def patiently(ctx: BatchContext, what: str, write: Callable[[], T]) -> T:
    """Retry a ledger read or write while Redis is unreachable, up to the context's patience.

    An outage of the ledger is not a failure of the job: its images are made (and stored), so
    its outcome waits for Redis instead of the batch being run again.
    """
    deadline = time.monotonic() + ctx.ledger_patience_s
    pause = 0.2
    while True:
        try:
            return write()
        except RedisError as e:
            if time.monotonic() > deadline:
                raise
            log.warning("the ledger is unreachable while %s (%s); retrying", what, e)
            ctx.on_step()  # waiting for the ledger is not a wedged loop
            time.sleep(pause)
            pause = min(pause * 2, 2.0)


def claim(ctx: BatchContext, records: Sequence[JobRecord]) -> list[Claim]:
    """Move each dispatched job to running under a new attempt; skip those that left."""
    now = time.time()
    changes = [
        Change(
            "claim",
            record.id,
            worker=ctx.worker,
            lease=now + ctx.lease_s,
            fields={
                "started_at": now,
                "progress": Progress(step=0, total_steps=record.request.steps),
            },
        )
        for record in records
    ]
    claims = []
    for record, applied in zip(records, ctx.store.apply(changes), strict=True):
        if applied.ok:
            claims.append(Claim(record, applied.attempt, now))
        else:
            log.info("job %s is %s, not dispatched; skipping", record.id, applied.before or "gone")
    return claims


def renew(ctx: BatchContext, claims: Sequence[Claim], **fields: object) -> None:
    """Extend the leases of the live claims (with `fields`, e.g. progress), in one round trip.

    A claim whose write is refused was canceled, or taken from this attempt (its lease ran out
    and the job was handed back): it is live no more, and nothing more of it is written.
    """
    renew_each(ctx, [(c, fields) for c in claims])


def renew_each(ctx: BatchContext, claims: Sequence[tuple[Claim, Mapping[str, object]]]) -> None:
    """As `renew`, each claim with fields of its own (the step engine's progress per job)."""
    live = [(c, fields) for c, fields in claims if c.live]
    lease = time.time() + ctx.lease_s
    changes = [
        Change("renew", c.job_id, attempt=c.attempt, worker=ctx.worker, lease=lease, fields=fields)
        for c, fields in live
    ]
    for (c, _), applied in zip(live, ctx.store.apply(changes), strict=True):
        c.live = applied.ok
        if not applied.ok:
            _refused(c, applied)


def _refused(c: Claim, applied: Applied) -> None:
    if applied.before == JobStatus.CANCELED.value:
        log.info("job %s was canceled while running", c.job_id)
    elif (applied.before, applied.attempt) == (JobStatus.SUCCEEDED.value, c.attempt):
        # Only this attempt can have written that: its first write applied, and its reply was
        # lost (a timeout) before the retry.
        log.info("job %s: attempt %d's outcome was recorded already", c.job_id, c.attempt)
    else:
        log.warning(
            "job %s: attempt %d no longer holds the job (it is %s, attempt %d); "
            "its writes are refused",
            c.job_id,
            c.attempt,
            applied.before or "gone",
            applied.attempt,
        )


def overdue(ctx: BatchContext, claims: Sequence[Claim]) -> int:
    """Fail the live claims past their deadline or the model's longest run; how many.

    A failed claim is live no more: its rows are dropped (the call is interrupted at the next
    step when no row is left) and its images never stored. Best effort: on a ledger outage the
    recovery sweep fails them once Redis is back.
    """
    now, failed_now = time.time(), []
    for c in claims:
        if not c.live:
            continue
        deadline = c.record.deadline_at
        if deadline is not None and now > deadline:
            failed_now.append(
                (c, "deadline_exceeded", "the job did not finish before its deadline")
            )
        elif ctx.max_run_s is not None and now - c.claimed_at > ctx.max_run_s:
            message = f"the job ran longer than this model allows ({ctx.max_run_s:g} s)"
            failed_now.append((c, "run_timeout", message))
    if not failed_now:
        return 0
    changes = [failed(ctx, c, code, message) for c, code, message in failed_now]
    for (c, code, _), applied in zip(failed_now, ctx.store.apply(changes), strict=True):
        c.live = False
        log.info("job %s failed while running: %s (%s)", c.job_id, code, applied.ok)
    return len(failed_now)


class Progressor:
    """Writes throttled progress for a call's jobs and notices rows canceled meanwhile."""

    def __init__(self, ctx: BatchContext, claims: Sequence[Claim], total: int) -> None:
        self.ctx, self.claims, self.total = ctx, claims, total
        self.last = time.monotonic()

    def __call__(self, step: int) -> bool:
        """Report `step`; answer whether any row of the call is still wanted."""
        self.ctx.on_step()
        now = time.monotonic()
        if now - self.last >= self.ctx.progress_interval_s or step == self.total:
            self.last = now
            try:
                renew(self.ctx, self.claims, progress=Progress(step=step, total_steps=self.total))
                overdue(self.ctx, self.claims)
            except RedisError as e:
                # Progress is best effort; the heartbeat keeps the lease when Redis is back.
                log.warning("progress not written (Redis: %s); the batch goes on", e)
        wanted = any(c.live for c in self.claims)
        if not wanted:
            log.info("every row of the batch was canceled; interrupting the pipeline")
        return wanted


def encode(image: Image, fmt: str) -> bytes:
    """An image as bytes of the requested format."""
    buf = io.BytesIO()
    image.save(buf, format=PIL_FORMATS[fmt])
    return buf.getvalue()


def failed(ctx: BatchContext, claim_: Claim, code: str, message: str) -> Change:
    """The change that marks a job failed with a short public reason."""
    fields = {"finished_at": time.time(), "error": ErrorInfo(code=code, message=message)}
    return Change(
        "finish",
        claim_.job_id,
        attempt=claim_.attempt,
        worker=ctx.worker,
        to=JobStatus.FAILED,
        fields=fields,
    )


def fail(ctx: BatchContext, claim_: Claim, code: str, message: str) -> None:
    """Mark a job failed (a stale attempt's write is refused), waiting out a ledger outage."""
    change = failed(ctx, claim_, code, message)
    applied = patiently(ctx, f"failing job {claim_.job_id}", lambda: ctx.store.change(change))
    if not applied.ok:
        _refused(claim_, applied)
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
            _refused(claim_, outcome)
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
        fail(ctx, claims[0], "pipeline_error", f"the model could not run this job: {e}")
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
