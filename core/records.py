"""A job's ledger record: what the ledger's hash holds, written and read back leniently."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from core.errors import UnreadableRecord
from core.events import WebhookSpec
from core.jobs import ErrorInfo, JobRequest, JobStatus, Metrics, Progress, StoredImage


@dataclass(frozen=True)
class JobRecord:
    """A job as the ledger holds it (the API adds URLs and queue position on read)."""

    id: str
    tenant: str
    status: JobStatus
    attempt: int
    created_at: float
    request: JobRequest
    model: str = ""
    priority: str = "normal"
    units: float = 0.0
    dispatched_at: float | None = None  # while queued: when its message went out
    started_at: float | None = None
    finished_at: float | None = None
    progress: Progress | None = None
    outputs: list[StoredImage] = field(default_factory=list)
    error: ErrorInfo | None = None
    metrics: Metrics = field(default_factory=Metrics)
    worker: str | None = None
    webhook: WebhookSpec | None = None
    deadline_at: float | None = None
    expires_at: float | None = None  # set when the job ends
    deleted: bool = False  # a tombstone: deleted by its owner, gone for good shortly
    trace: str | None = None  # the W3C traceparent of its submit, when tracing is on


def encode(**values: Any) -> dict[str, str]:
    """Hash fields for a record's values: models as JSON, numbers as text."""
    out: dict[str, str] = {}
    for name, value in values.items():
        if value is None:
            out[name] = ""
        elif isinstance(value, list):
            out[name] = json.dumps([v.model_dump(mode="json") for v in value])
        elif hasattr(value, "model_dump_json"):
            out[name] = value.model_dump_json()
        else:
            out[name] = str(value)
    return out


def _opt_float(raw: str | None) -> float | None:
    return float(raw) if raw else None


def decode(job_id: str, raw: Mapping[str, str]) -> JobRecord | None:
    """The record stored in a job hash, or None when the hash is gone.

    Read leniently: a field that a newer writer added is ignored. A record that still cannot be
    parsed raises UnreadableRecord, for the caller to quarantine.
    """
    if not raw:
        return None
    try:
        return _decode(job_id, raw)
    except (ValidationError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise UnreadableRecord(job_id, type(e).__name__) from e


def _decode(job_id: str, raw: Mapping[str, str]) -> JobRecord:
    def model(cls: Any, name: str) -> Any:
        value = raw.get(name)
        return cls.model_validate_json(value, extra="ignore") if value else None

    return JobRecord(
        id=job_id,
        tenant=raw["tenant"],
        status=JobStatus(raw["status"]),
        attempt=int(raw.get("attempt") or 0),
        created_at=float(raw["created_at"]),
        request=JobRequest.model_validate_json(raw["request"], extra="ignore"),
        model=raw.get("model") or "",
        priority=raw.get("priority") or "normal",
        units=float(raw.get("units") or 0),
        dispatched_at=_opt_float(raw.get("dispatched_at")),
        started_at=_opt_float(raw.get("started_at")),
        finished_at=_opt_float(raw.get("finished_at")),
        progress=model(Progress, "progress"),
        outputs=[StoredImage.model_validate(o) for o in json.loads(raw.get("outputs") or "[]")],
        error=model(ErrorInfo, "error"),
        metrics=model(Metrics, "metrics") or Metrics(),
        worker=raw.get("worker") or None,
        webhook=model(WebhookSpec, "webhook"),
        deadline_at=_opt_float(raw.get("deadline_at")),
        expires_at=_opt_float(raw.get("expires_at")),
        deleted=bool(raw.get("deleted_at")),
        trace=raw.get("trace") or None,
    )


def salvage(raw: str | None) -> JobRequest:
    """What can be recovered of an unreadable stored request (its free-form metadata dropped)."""
    try:
        data = json.loads(raw or "")
        data.pop("metadata", None)
        return JobRequest.model_validate(data, extra="ignore")
    except (ValueError, TypeError, AttributeError, RecursionError):
        return JobRequest.model_validate({"prompt": "(unreadable)"})


@dataclass(frozen=True)
class Unreadable:
    """A record that could not be parsed, in a batch read."""

    job_id: str
    reason: str


Read = JobRecord | Unreadable | None


def decode_many(ids: Sequence[str], raws: Sequence[Mapping[str, str]]) -> list[Read]:
    """Records of a batch read; one that cannot be parsed does not spoil the others."""
    out: list[Read] = []
    for job_id, raw in zip(ids, raws, strict=True):
        try:
            out.append(decode(job_id, raw))
        except UnreadableRecord as e:
            out.append(Unreadable(job_id, e.reason))
    return out
