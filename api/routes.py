"""The v1 HTTP routes: thin, each one reads, calls the store, and shapes the answer."""

from __future__ import annotations

import asyncio
import base64
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
from api.admission import (
    admissible,
    checked_webhook,
    deadline_of,
    fingerprint,
    limit_error,
    resolved,
)
from api.deps import Caller, CallerDep, ResourcesDep
from api.openapi import EVENTS, FILE, OPEN, SUBMIT_EXAMPLES, EventStream, errors
from api.resources import Resources
from core import keys
from core.deliveries import read_log
from core.errors import (
    Conflict,
    LimitExceeded,
    NotFound,
    StorageError,
    Unavailable,
    UnreadableRecord,
    ValidationFailed,
)
from core.events import EventType
from core.jobs import (
    MAX_SEED,
    Job,
    JobCreate,
    JobStatus,
    Metrics,
    Output,
    QueueInfo,
    new_job_id,
)
from core.records import JobRecord, Unreadable
from core.storage import CONTENT_TYPES, FileStore, job_folder
from core.store import Change, Place

log = logging.getLogger(__name__)
router = APIRouter()


class JobPage(BaseModel):
    """One page of a tenant's jobs, newest first."""

    jobs: list[Job]
    next_cursor: str | None


class Redelivery(BaseModel):
    """The event queued again by a redelivery."""

    event: EventType
    webhook_id: str


async def render(res: Resources, record: JobRecord, place: Place | None, http: Request) -> Job:
    """A record as the client sees it, with queue position and fresh URLs."""
    queue = None
    if record.status is JobStatus.QUEUED and place is not None:
        pool = await res.throughput.pool(record.model)
        to_done = place.units_ahead + record.units
        queue = views.queue_info(place.jobs_ahead, to_done, pool.units_per_s, pool, record.model)
    outputs: list[Output] = []
    if record.outputs:
        # Local file links start with DQ_PUBLIC_URL (relative without it), never with the
        # request's Host: a client must not choose where the links it is handed point.
        base = res.settings.public_url or ""
        outputs = views.outputs_with_urls(record.outputs, res.storage, res.settings.url_ttl_s, base)
    deliveries = await read_log(res.redis, record.id) if record.webhook else None
    return views.public_job(record, queue=queue, outputs=outputs, deliveries=deliveries)


def json_of(job: Job, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A job serialized once by pydantic (FastAPI would validate it again on the hot path)."""
    return Response(job.model_dump_json(), status, headers, media_type="application/json")


JOB_ID = re.compile(r"job_[0-9a-f]{32}")  # what new_job_id makes


async def owned(caller: Caller, job_id: str) -> tuple[JobRecord, Place | None]:
    """A caller's job and, while queued, its place; another tenant's job is not found (an admin
    sees every job). A record that cannot be read is quarantined: the job fails, and is shown.
    """
    if not JOB_ID.fullmatch(job_id):  # nothing else is a job: Redis is not even asked
        raise NotFound(f"no job {job_id[:64]}")
    res = caller.res
    try:
        record, place = await res.jobs.get(job_id)
    except UnreadableRecord:
        await res.jobs.quarantine(job_id)
        record, place = await res.jobs.get(job_id)
    if record is None or record.deleted or (record.tenant != caller.tenant and not caller.admin):
        raise NotFound(f"no job {job_id}")
    return record, place


@router.post(
    "/v1/jobs",
    status_code=202,
    response_model=Job,
    tags=["jobs"],
    summary="Submit a job",
    operation_id="submit_job",
    responses=errors(401, 404, 413, 422, 429, 503),
    openapi_extra=SUBMIT_EXAMPLES,
)
async def submit(
    request: JobCreate,
    http: Request,
    caller: CallerDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
    cancel_after: Annotated[
        str | None,
        Header(
            max_length=32,
            description="fail the job unless it finished within this long (30, 90s, 5m, 1h)",
        ),
    ] = None,
) -> Response:
    """Submit a job; answers 202 with the queued job at once."""
    res, tenant = caller.res, caller.tenant
    limits = await res.keys.limits(tenant)
    asked = admissible(resolved(res, request), limits)
    await checked_webhook(res, tenant, request.webhook)
    seeded = asked if asked.seed is not None else asked.seeded(secrets.randbelow(MAX_SEED))
    now = time.time()
    within = deadline_of(seeded.deadline_s, cancel_after)
    record = JobRecord(
        id=new_job_id(),
        tenant=tenant,
        status=JobStatus.QUEUED,
        attempt=0,
        created_at=now,
        deadline_at=None if within is None else now + within,
        request=seeded,
        model=seeded.model or res.catalog.default,
        priority=seeded.priority,
        units=seeded.units,
        metrics=Metrics(),
        webhook=request.webhook,
        trace=res.tracing.traceparent(),  # the job's later spans continue this request's trace
    )
    idem = None
    if idempotency_key:
        idem = (keys.idempotency(tenant, idempotency_key), f"{record.id} {fingerprint(request)}")
    with res.tracing.span("dq.admission", attributes={"dq.job_id": record.id}):
        admission = await res.jobs.submit(
            record, limits=limits.admission(), idempotency=idem, deadline=record.deadline_at
        )
    if admission.outcome == "full":
        raise Unavailable("the queue is full; retry later", retry_after_s=10, code="queue_full")
    if admission.outcome == "limited":
        raise limit_error(admission, limits)
    if admission.outcome == "duplicate":
        record = await _replay(caller, admission.value, fingerprint(request))
        place = None
    else:
        place = Place(False, (admission.position or 1) - 1, admission.units_ahead)
    job = await accepted(res, record, place, http)
    return json_of(job, 202, {"Location": f"/v1/jobs/{record.id}"})


async def accepted(res: Resources, record: JobRecord, place: Place | None, http: Request) -> Job:
    """The job as just admitted. It is recorded: nothing here may turn the 202 into an error, so
    what is not essential (the ETA, the delivery log) is left out if it cannot be had.
    """
    try:
        return await render(res, record, place, http)
    except Exception:
        log.exception("job %s: admitted, answered without its queue details", record.id)
        queue = None if place is None else QueueInfo(position=place.jobs_ahead + 1, eta_s=None)
        return views.public_job(record, queue=queue, outputs=[])


async def _replay(caller: Caller, stored: str, fp: str) -> JobRecord:
    """The job an earlier submission with the same Idempotency-Key created."""
    job_id, _, stored_fp = stored.partition(" ")
    if stored_fp != fp:
        raise ValidationFailed(
            "this Idempotency-Key was used with a different body; use a new key",
            field="Idempotency-Key",
            code="idempotency_mismatch",
        )
    record, _ = await owned(caller, job_id)
    return record


TERMINAL = frozenset(s.value for s in JobStatus if s.terminal)
MAX_WAIT_S = 60.0


@router.get(
    "/v1/jobs/{job_id}",
    response_model=Job,
    tags=["jobs"],
    summary="Read a job, or wait for it to end",
    operation_id="get_job",
    responses=errors(401, 404, 422, 429, 503),
)
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
    res = caller.res
    if wait > 0:
        record, place = await _until_ended(caller, job_id, wait)
    else:
        record, place = await owned(caller, job_id)
    return json_of(await render(res, record, place, http))


async def _until_ended(
    caller: Caller, job_id: str, wait_s: float
) -> tuple[JobRecord, Place | None]:
    """The job once it has ended, or as it is when `wait_s` is over (a long poll)."""
    res = caller.res
    with res.watcher.watch(job_id, TERMINAL) as waiter:  # before the read: no change slips by
        record, place = await owned(caller, job_id)
        deadline = time.monotonic() + wait_s
        while not record.status.terminal and (left := deadline - time.monotonic()) > 0:
            await waiter.changed(left, subscribed=res.watcher.subscribed)
            record, place = await owned(caller, job_id)
    return record, place


LIST_SCAN = 500  # index entries one list request reads at most (a status filter may match few)
SCAN_BATCH = 100  # entries read per round trip while filtering


@router.get(
    "/v1/jobs",
    response_model=JobPage,
    tags=["jobs"],
    summary="List your jobs",
    operation_id="list_jobs",
    responses=errors(401, 422, 429, 503),
)
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
        records = await readable(res, [job_id for job_id, _ in rows])
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


async def readable(res: Resources, job_ids: list[str]) -> list[JobRecord | None]:
    """Records of a page; one that cannot be read is quarantined and read again."""
    records = await res.jobs.get_many(job_ids)
    bad = [r.job_id for r in records if isinstance(r, Unreadable)]
    for job_id in bad:
        await res.jobs.quarantine(job_id)
    if bad:
        records = await res.jobs.get_many(job_ids)
    return [r if isinstance(r, JobRecord) else None for r in records]


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


@router.post(
    "/v1/jobs/{job_id}/cancel",
    response_model=Job,
    tags=["jobs"],
    summary="Cancel a job",
    operation_id="cancel_job",
    responses=errors(401, 404, 409, 422, 429, 503),
)
async def cancel(job_id: str, http: Request, caller: CallerDep) -> Job:
    """Cancel: a queued job never runs; a running one is dropped from its batch."""
    res = caller.res
    record, _ = await owned(caller, job_id)
    if record.status.terminal:
        raise Conflict(f"job {job_id} already {record.status.value}", code="already_finished")
    applied = await res.jobs.change(Change("cancel", job_id, fields={"finished_at": time.time()}))
    if not applied.ok:
        raise Conflict(f"job {job_id} already {applied.before}", code="already_finished")
    record, place = await owned(caller, job_id)
    return await render(res, record, place, http)


@router.delete(
    "/v1/jobs/{job_id}",
    status_code=204,
    tags=["jobs"],
    summary="Delete a job, its images and its inputs",
    operation_id="delete_job",
    responses=errors(401, 404, 422, 429, 503),
)
async def delete(job_id: str, caller: CallerDep) -> Response:
    """Delete a job: canceled first if it has not ended, its images and inputs removed from
    storage at once, its record gone (404) from now on."""
    res = caller.res
    record, _ = await owned(caller, job_id)
    if not record.status.terminal:
        await res.jobs.change(Change("cancel", job_id, fields={"finished_at": time.time()}))
    folder = job_folder(getattr(res.storage, "prefix", ""), job_id)
    await asyncio.to_thread(res.storage.delete_folder, folder)
    await res.jobs.tombstone(record)
    log.info("job %s deleted", job_id)
    return Response(status_code=204)


@router.post(
    "/v1/jobs/{job_id}/webhooks/redeliver",
    status_code=202,
    response_model=Redelivery,
    tags=["webhooks"],
    summary="Send a job's last webhook event again",
    operation_id="redeliver_webhook",
    responses=errors(401, 404, 409, 422, 429, 503),
)
async def redeliver(job_id: str, caller: CallerDep) -> Redelivery:
    """Send the job's last webhook event again (same webhook-id, a new series of attempts)."""
    res = caller.res
    record, _ = await owned(caller, job_id)
    if record.webhook is None:
        raise Conflict(f"job {job_id} has no webhook", code="no_webhook")
    await limit_redeliveries(res, caller.tenant, job_id)
    order = await res.jobs.redeliver(job_id)
    if order is None:
        raise Conflict(f"job {job_id} has no webhook event yet", code="no_webhook_event")
    return Redelivery(event=order.event, webhook_id=order.webhook_id)


async def limit_redeliveries(res: Resources, tenant: str, job_id: str) -> None:
    """At most DQ_REDELIVER_PER_JOB per job and DQ_REDELIVER_PER_TENANT per tenant an hour."""
    per_job, per_tenant = res.settings.redeliver_per_job, res.settings.redeliver_per_tenant
    for name, count in ((f"redeliver:job:{job_id}", per_job), (f"redeliver:{tenant}", per_tenant)):
        wait = await res.limiter.wait_s(name, count / 3600, count)
        if wait:
            scope = "job" if ":job:" in name else "tenant"
            raise LimitExceeded(
                f"at most {count} redeliveries per {scope} an hour; retry in {wait:.0f} s",
                limit=f"redeliver_per_{scope}",
                retry_after_s=wait,
                policy=f'"redeliver_per_{scope}";q={count};w=3600',
                remaining=0,
            )


@router.get(
    "/v1/jobs/{job_id}/events",
    tags=["jobs"],
    summary="Stream a job's changes (Server-Sent Events)",
    operation_id="job_events",
    response_class=EventStream,
    responses={**EVENTS, **errors(401, 404, 422, 429, 503)},
)
async def events(job_id: str, http: Request, caller: CallerDep) -> StreamingResponse:
    """Server-Sent Events: the job each time its status, progress or queue position changes."""
    await owned(caller, job_id)
    return StreamingResponse(_stream(caller, job_id, http), media_type="text/event-stream")


QUEUED_REREAD_S = 1.0  # how often a stream re-reads a queued job's position
KEEPALIVE_S = 15.0  # a comment line this often keeps idle proxies from closing the stream


async def _stream(caller: Caller, job_id: str, http: Request) -> AsyncIterator[str]:
    res = caller.res
    last, quiet_since = "", time.monotonic()
    with res.watcher.watch(job_id) as waiter:
        while True:
            record, place = await owned(caller, job_id)
            job = await render(res, record, place, http)
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


@router.get(
    "/v1/files/{key:path}",
    tags=["files"],
    summary="An image, through a signed URL a job handed out",
    operation_id="get_file",
    response_class=FileResponse,
    responses={**FILE, **errors(404, 422)},
    openapi_extra=OPEN,
)
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


@router.get(
    "/healthz", tags=["health"], summary="Liveness", operation_id="healthz", openapi_extra=OPEN
)
async def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    tags=["health"],
    summary="Readiness: Redis and storage reachable",
    operation_id="readyz",
    responses=errors(503),
    openapi_extra=OPEN,
)
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
