"""Ledger records turned into the job a client reads: by the gateway, and in webhook payloads."""

from __future__ import annotations

from core.events import DeliveryRecord, WebhookView
from core.jobs import Job, JobStatus, Output, QueueInfo, StoredImage, to_datetime
from core.records import JobRecord
from core.storage import ObjectStore


def outputs_with_urls(
    images: list[StoredImage], storage: ObjectStore, ttl_s: int, base_url: str
) -> list[Output]:
    """Outputs with URLs minted now (presigned or signed, expiring)."""
    minted = []
    for image in images:
        url = storage.url(image.key, ttl_s)
        if url.startswith("/"):
            url = base_url.rstrip("/") + url
        minted.append(Output(url=url, seed=image.seed, width=image.width, height=image.height))
    return minted


def webhook_view(record: JobRecord, deliveries: list[DeliveryRecord]) -> WebhookView | None:
    """The job's webhook and its delivery log, if it has one."""
    if record.webhook is None:
        return None
    spec = record.webhook
    return WebhookView(url=spec.url, events=spec.events, deliveries=deliveries)


def public_job(
    record: JobRecord,
    *,
    queue: QueueInfo | None = None,
    outputs: list[Output],
    deliveries: list[DeliveryRecord] | None = None,
) -> Job:
    """The API's view of a record."""
    # The worker of the latest attempt (a job handed back keeps it in the ledger until claimed).
    worker = None if record.status is JobStatus.QUEUED else record.worker
    update = {"attempts": record.attempt, "worker": worker, "model": record.model or None}
    metrics = record.metrics.model_copy(update=update)
    return Job(
        id=record.id,
        status=record.status,
        created_at=to_datetime(record.created_at),  # type: ignore[arg-type]
        started_at=to_datetime(record.started_at),
        finished_at=to_datetime(record.finished_at),
        request=record.request,
        progress=record.progress if record.status is JobStatus.RUNNING else None,
        queue=queue if record.status is JobStatus.QUEUED else None,
        outputs=outputs,
        error=record.error,
        metrics=metrics,
        webhook=webhook_view(record, deliveries or []),
        deadline_at=to_datetime(record.deadline_at),
        expires_at=to_datetime(record.expires_at),
    )
