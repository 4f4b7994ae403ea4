"""Ledger records turned into the job a client reads."""

from __future__ import annotations

from core.jobs import Job, JobStatus, Output, QueueInfo, StoredImage, to_datetime
from core.storage import FileStore, S3Store
from core.store import JobRecord


def queue_info(rank: int | None, images_ahead: int, images_per_s: float | None) -> QueueInfo | None:
    """Position (1 = next) and an ETA from the workers' measured throughput."""
    if rank is None:
        return None
    eta = images_ahead / images_per_s if images_per_s else None
    return QueueInfo(position=rank + 1, eta_s=None if eta is None else round(eta, 2))


def outputs_with_urls(
    images: list[StoredImage], storage: S3Store | FileStore, ttl_s: int, base_url: str
) -> list[Output]:
    """Outputs with URLs minted now (presigned or signed, expiring)."""
    minted = []
    for image in images:
        url = storage.url(image.key, ttl_s)
        if url.startswith("/"):
            url = base_url.rstrip("/") + url
        minted.append(Output(url=url, seed=image.seed, width=image.width, height=image.height))
    return minted


def public_job(
    record: JobRecord,
    *,
    queue: QueueInfo | None = None,
    outputs: list[Output],
) -> Job:
    """The API's view of a record."""
    metrics = record.metrics.model_copy(update={"attempts": record.attempt})
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
    )
