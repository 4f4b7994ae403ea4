"""The v1 HTTP routes: thin, each one reads, calls the store, and shapes the answer."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import math
import re
import secrets
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BaseModel

from api import views
from api.deps import CallerDep, ResourcesDep
from api.resources import Resources
from core import heartbeats, keys
from core.deliveries import read_log
from core.errors import (
    Conflict,
    IllegalTransition,
    NotFound,
    StorageError,
    Unavailable,
    ValidationFailed,
)
from core.events import EventType, WebhookSpec
from core.jobs import (
    MAX_SEED,
    Job,
    JobCreate,
    JobRequest,
    JobStatus,
    Metrics,
    Output,
    new_job_id,
)
from core.storage import CONTENT_TYPES, FileStore
from core.store import JobRecord
from core.urlguard import check_url

log = logging.getLogger(__name__)
router = APIRouter()


class JobPage(BaseModel):
    """One page of a tenant's jobs, newest first."""

    jobs: list[Job]
    next_cursor: str | None


class ScalerView(BaseModel):
    """The autoscaler's last decision."""

    current: int
    desired: int
    reason: str


class QueueStatus(BaseModel):
    """The queue as a whole."""

    queued: int
    running: int
    workers: int
    images_per_s: float | None
    eta_s: float | None
    scaler: ScalerView | None = None  # None while no scaler is deciding


class Redelivery(BaseModel):
    """The event queued again by a redelivery."""

    event: EventType
    webhook_id: str


async def render(res: Resources, record: JobRecord, rank: int | None, http: Request) -> Job:
    """A record as the client sees it, with queue position and fresh URLs."""
    queue = None
    if record.status is JobStatus.QUEUED:
        ahead = (rank or 0) + record.request.num_images
        queue = views.queue_info(rank, ahead, await res.throughput.get())
    outputs: list[Output] = []
    if record.outputs:
        # Local file links start with DQ_PUBLIC_URL (relative without it), never with the
        # request's Host: a client must not choose where the links it is handed point.
        base = res.settings.public_url or ""
        outputs = views.outputs_with_urls(record.outputs, res.storage, res.settings.url_ttl_s, base)
    deliveries = await read_log(res.redis, record.id) if record.webhook else None
    return views.public_job(record, queue=queue, outputs=outputs, deliveries=deliveries)


def fingerprint(request: JobRequest) -> str:
    """What makes two submissions 'the same' for Idempotency-Key."""
    body = request.model_dump(mode="json")
    if body.get("webhook", 0) is None:
        del body["webhook"]  # fingerprints of submissions without a webhook stay as they were
    canonical = json.dumps(body, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


async def checked_webhook(res: Resources, tenant: str, spec: WebhookSpec | None) -> None:
    """Refuse a webhook this server cannot sign or must not call (the guard runs again at send)."""
    if spec is None:
        return
    if not res.settings.webhook_signing_secrets(tenant):
        raise ValidationFailed(
            "webhooks are not enabled on this server: its operator must set DQ_WEBHOOK_SECRET",
            field="webhook",
            code="webhooks_disabled",
        )
    # Resolving the host blocks; keep it off the event loop.
    await asyncio.to_thread(check_url, spec.url, allow_private=res.settings.webhook_allow_private)


def json_of(job: Job, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A job serialized once by pydantic (FastAPI would validate it again on the hot path)."""
    return Response(job.model_dump_json(), status, headers, media_type="application/json")


JOB_ID = re.compile(r"job_[0-9a-f]{32}")  # what new_job_id makes


async def owned(res: Resources, tenant: str, job_id: str) -> tuple[JobRecord, int | None]:
    """A tenant's job and its queue rank; another tenant's job is not found."""
    if not JOB_ID.fullmatch(job_id):  # nothing else is a job: Redis is not even asked
        raise NotFound(f"no job {job_id[:64]}")
    record, rank = await res.jobs.get(job_id)
    if record is None or record.tenant != tenant:
        raise NotFound(f"no job {job_id}")
    return record, rank


@router.post("/v1/jobs", status_code=202, response_model=Job, tags=["jobs"])
async def submit(
    request: JobCreate,
    http: Request,
    caller: CallerDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> Response:
    """Submit a job; answers 202 with the queued job at once."""
    res, tenant = caller.res, caller.tenant
    await checked_webhook(res, tenant, request.webhook)
    asked = request.job_request()
    seeded = asked if asked.seed is not None else asked.seeded(secrets.randbelow(MAX_SEED))
    record = JobRecord(
        id=new_job_id(),
        tenant=tenant,
        status=JobStatus.QUEUED,
        attempt=0,
        created_at=time.time(),
        request=seeded,
        metrics=Metrics(),
        webhook=request.webhook,
    )
    idem = None
    if idempotency_key:
        idem = (keys.idempotency(tenant, idempotency_key), f"{record.id} {fingerprint(request)}")
    outcome, value = await res.jobs.submit(record, idem)
    if outcome == "full":
        raise Unavailable("the queue is full; retry later", retry_after_s=10, code="queue_full")
    if outcome == "duplicate":
        record = await _replay(res, tenant, value, fingerprint(request))
    job = await render(res, record, 0 if outcome == "created" else None, http)
    return json_of(job, 202, {"Location": f"/v1/jobs/{record.id}"})


async def _replay(res: Resources, tenant: str, stored: str, fp: str) -> JobRecord:
    """The job an earlier submission with the same Idempotency-Key created."""
    job_id, _, stored_fp = stored.partition(" ")
    if stored_fp != fp:
        raise ValidationFailed(
            "this Idempotency-Key was used with a different body; use a new key",
            field="Idempotency-Key",
            code="idempotency_mismatch",
        )
    record, _ = await owned(res, tenant, job_id)
    return record


TERMINAL = frozenset(s.value for s in JobStatus if s.terminal)
MAX_WAIT_S = 60.0


@router.get("/v1/jobs/{job_id}", response_model=Job, tags=["jobs"])
async def get_job(
    job_id: str,
    http: Request,
    caller: CallerDep,
    wait: Annotated[
        float,
        Query(
            ge=0,
            le=MAX_WAIT_S,
            description="Hold the request up to this many seconds until the job has ended "
            "(a long poll: the answer comes the moment it ends, then read `status`).",
        ),
    ] = 0,
) -> Response:
    """One job, with output URLs minted fresh; with `wait`, once it ends or the wait is over."""
    res, tenant = caller.res, caller.tenant
    if wait > 0:
        record, rank = await _until_ended(res, tenant, job_id, wait)
    else:
        record, rank = await owned(res, tenant, job_id)
    return json_of(await render(res, record, rank, http))


async def _until_ended(
    res: Resources, tenant: str, job_id: str, wait_s: float
) -> tuple[JobRecord, int | None]:
    """The job once it has ended, or as it is when `wait_s` is over (a long poll)."""
    with res.watcher.watch(job_id, TERMINAL) as waiter:  # before the read: no change slips by
        record, rank = await owned(res, tenant, job_id)
        deadline = time.monotonic() + wait_s
        while not record.status.terminal and (left := deadline - time.monotonic()) > 0:
            await waiter.changed(left, subscribed=res.watcher.subscribed)
            record, rank = await owned(res, tenant, job_id)
    return record, rank


LIST_SCAN = 500  # index entries one list request reads at most (a status filter may match few)
SCAN_BATCH = 100  # entries read per round trip while filtering


@router.get("/v1/jobs", response_model=JobPage, tags=["jobs"])
async def list_jobs(
    http: Request,
    caller: CallerDep,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=4096)] = None,
) -> JobPage:
    """The caller's jobs, newest first, filtered by status, cursor-paginated.

    One request reads at most LIST_SCAN entries of the tenant's index: a filter that matches few
    jobs may answer fewer than `limit` (even none) with a `next_cursor` to read on from.
    """
    res, tenant = caller.res, caller.tenant
    before, skip = _decode_cursor(cursor)
    found: list[JobRecord] = []
    scanned, exhausted = 0, False
    while len(found) < limit and scanned < LIST_SCAN and not exhausted:
        want = limit - len(found) if status is None else SCAN_BATCH
        want = min(want, LIST_SCAN - scanned)
        rows = await res.jobs.page(tenant, before, want + len(skip))
        exhausted = len(rows) < want + len(skip)
        rows = [r for r in rows if r[0] not in skip]
        records = await res.jobs.get_many([job_id for job_id, _ in rows])
        await res.jobs.forget(tenant, [j for (j, _), r in zip(rows, records, strict=True) if not r])
        for row, record in zip(rows, records, strict=True):
            scanned += 1
            before, skip = _advance(before, skip, row)
            if record and (status is None or record.status is status):
                found.append(record)
            if len(found) == limit:
                exhausted = exhausted and row == rows[-1]
                break
    jobs = [await render(res, r, None, http) for r in found]
    return JobPage(jobs=jobs, next_cursor=None if exhausted else _encode_cursor(before, skip))


def _advance(before: float, skip: set[str], row: tuple[str, float]) -> tuple[float, set[str]]:
    """Move the page window past `row`, remembering ids that share its score."""
    job_id, score = row
    return score, (skip | {job_id}) if score == before else {job_id}


def _encode_cursor(before: float, skip: set[str]) -> str:
    raw = json.dumps({"b": before, "s": sorted(skip)})
    return base64.urlsafe_b64encode(raw.encode()).decode()


def _decode_cursor(cursor: str | None) -> tuple[float, set[str]]:
    """The window a cursor names; refuses anything this API did not make (NaN, say)."""
    if not cursor:
        return math.inf, set()
    try:
        data = json.loads(base64.urlsafe_b64decode(cursor.encode()), parse_constant=_no_constant)
        before, skip = data["b"], data["s"]
        if not isinstance(before, int | float) or not math.isfinite(before):
            raise TypeError("b is not a finite number")
        if not isinstance(skip, list) or not all(
            isinstance(j, str) and JOB_ID.fullmatch(j) for j in skip
        ):
            raise TypeError("s is not a list of job ids")
        return float(before), set(skip)
    except (ValueError, KeyError, TypeError) as e:
        raise ValidationFailed("cursor is not one this API returned", field="cursor") from e


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number")


@router.post("/v1/jobs/{job_id}/cancel", response_model=Job, tags=["jobs"])
async def cancel(job_id: str, http: Request, caller: CallerDep) -> Job:
    """Cancel: a queued job never runs; a running one is dropped from its batch."""
    res, tenant = caller.res, caller.tenant
    record, _ = await owned(res, tenant, job_id)
    if record.status.terminal:
        raise Conflict(f"job {job_id} already {record.status.value}", code="already_finished")
    try:
        await res.jobs.transition(job_id, JobStatus.CANCELED, finished_at=time.time())
    except IllegalTransition as e:
        raise Conflict(f"job {job_id} already {e.current}", code="already_finished") from e
    record, rank = await owned(res, tenant, job_id)
    return await render(res, record, rank, http)


@router.post(
    "/v1/jobs/{job_id}/webhooks/redeliver",
    status_code=202,
    response_model=Redelivery,
    tags=["webhooks"],
)
async def redeliver(job_id: str, caller: CallerDep) -> Redelivery:
    """Send the job's last webhook event again (same webhook-id, a new series of attempts)."""
    res, tenant = caller.res, caller.tenant
    record, _ = await owned(res, tenant, job_id)
    if record.webhook is None:
        raise Conflict(f"job {job_id} has no webhook", code="no_webhook")
    order = await res.jobs.redeliver(job_id)
    if order is None:
        raise Conflict(f"job {job_id} has no webhook event yet", code="no_webhook_event")
    return Redelivery(event=order.event, webhook_id=order.webhook_id)


@router.get("/v1/jobs/{job_id}/events", tags=["jobs"])
async def events(job_id: str, http: Request, caller: CallerDep) -> StreamingResponse:
    """Server-Sent Events: the job each time its status, progress or queue position changes."""
    res, tenant = caller.res, caller.tenant
    await owned(res, tenant, job_id)
    return StreamingResponse(_stream(res, tenant, job_id, http), media_type="text/event-stream")


QUEUED_REREAD_S = 1.0  # how often a stream re-reads a queued job's position
KEEPALIVE_S = 15.0  # a comment line this often keeps idle proxies from closing the stream


async def _stream(res: Resources, tenant: str, job_id: str, http: Request) -> AsyncIterator[str]:
    last, quiet_since = "", time.monotonic()
    with res.watcher.watch(job_id) as waiter:
        while True:
            record, rank = await owned(res, tenant, job_id)
            job = await render(res, record, rank, http)
            state = job.model_dump_json(include={"status", "progress", "queue"})
            if state != last:
                last, quiet_since = state, time.monotonic()
                yield f"event: {job.status.value}\ndata: {job.model_dump_json()}\n\n"
            elif time.monotonic() - quiet_since >= KEEPALIVE_S:
                quiet_since = time.monotonic()
                yield ": keep-alive\n\n"
            if record.status.terminal:
                return
            # A queued job's position moves when others leave the queue: re-read now and then.
            within = QUEUED_REREAD_S if record.status is JobStatus.QUEUED else KEEPALIVE_S
            await waiter.changed(within, subscribed=res.watcher.subscribed)


@router.get("/v1/queue", response_model=QueueStatus, tags=["queue"])
async def queue(caller: CallerDep) -> QueueStatus:
    """Depth, running jobs, live workers, measured throughput and the wait for a new job."""
    res = caller.res
    queued, running = await res.jobs.counts()
    beats = await heartbeats.live_async(res.redis, res.settings.heartbeat_s * 3)
    rate = heartbeats.images_per_s(beats)
    eta = round((queued + 1) / rate, 2) if rate else None
    decided = await heartbeats.scaler_status_async(res.redis)
    scaler = ScalerView.model_validate(decided.model_dump()) if decided else None
    return QueueStatus(
        queued=queued,
        running=running,
        workers=len(beats),
        images_per_s=rate,
        eta_s=eta,
        scaler=scaler,
    )


@router.get("/v1/files/{key:path}", include_in_schema=False)
async def file(key: str, expires: int, sig: str, res: ResourcesDep) -> FileResponse:
    """A locally stored image, behind a signed, expiring URL."""
    store = res.storage
    # `key` is the path as the server decoded it, once: the very string that was signed.
    if not isinstance(store, FileStore) or not store.verify(key, expires, sig):
        log.info("file URL refused: bad or expired signature (key %.120r)", key)
        raise NotFound("no such file, or its link expired")
    path = store.path(key)
    if not path.is_file():
        raise NotFound("no such file")
    return FileResponse(
        path, media_type=CONTENT_TYPES.get(path.suffix.lstrip("."), "application/octet-stream")
    )


@router.get("/healthz", tags=["health"])
async def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/readyz", tags=["health"])
async def readyz(res: ResourcesDep) -> dict[str, str]:
    """Readiness: Redis and storage reachable."""
    # The causes go to the log only: a client learns nothing of the servers behind the gateway.
    try:
        await res.redis.ping()
    except Exception as e:
        log.warning("not ready: Redis: %.200s", e)
        raise Unavailable("the job store is not reachable") from e
    try:
        await asyncio.to_thread(res.storage.check)
    except StorageError as e:
        log.warning("not ready: %.200s", e.message)
        raise Unavailable("image storage is not reachable") from e
    return {"status": "ready"}
