"""What a worker holds of a job while it runs: the claim, the context a batch runs in, and the
ledger writes that keep or end a claim (claim, renew, progress, deadlines), retried through a
ledger outage.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from PIL.Image import Image
from redis.exceptions import RedisError

from core.catalog import Resize
from core.jobs import Bucket, ErrorInfo, JobStatus, Progress
from core.records import JobRecord
from core.storage import ObjectStore
from core.store import Applied, Change, JobStore
from core.tracing import Tracing
from worker.inference import Row, StepHook
from worker.inputs import InputLoader, Inputs

log = logging.getLogger(__name__)


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
            refused(c, applied)


def refused(c: Claim, applied: Applied) -> None:
    """Log why the ledger refused a claim's write: canceled, already recorded, or taken."""
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
