"""Webhook events: what a client subscribes to, the order to send one, and each attempt's record."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class EventType(StrEnum):
    """What happened to a job; a webhook subscribes to some of these."""

    RUNNING = "job.running"  # a worker attempt took the job (once per job, even if re-run)
    PROGRESS = "job.progress"  # denoising steps advanced; throttled, informational
    SUCCEEDED = "job.succeeded"
    FAILED = "job.failed"
    CANCELED = "job.canceled"


DEFAULT_EVENTS = (EventType.SUCCEEDED, EventType.FAILED, EventType.CANCELED)

# Status entered -> the event it creates. `queued` creates none: a client knows it submitted.
_ENTERED = {
    "running": EventType.RUNNING,
    "succeeded": EventType.SUCCEEDED,
    "failed": EventType.FAILED,
    "canceled": EventType.CANCELED,
}


def event_entering(status: str) -> EventType | None:
    """The event a job creates when it enters `status`, if any."""
    return _ENTERED.get(status)


def webhook_id(job_id: str, event: EventType, suffix: str = "") -> str:
    """The `webhook-id` of a job's event: unique per (job, event type), stable across retries."""
    # No dots: the id is signed as "id.timestamp.body".
    name = event.value.removeprefix("job.")
    return f"msg_{job_id}_{name}" + (f"_{suffix}" if suffix else "")


class WebhookSpec(BaseModel):
    """The webhook a client asks for on submit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(min_length=1, description="http(s) URL on a public address")
    events: list[EventType] = Field(default_factory=lambda: list(DEFAULT_EVENTS), min_length=1)

    @field_validator("events")
    @classmethod
    def _once_each(cls, value: list[EventType]) -> list[EventType]:
        return list(dict.fromkeys(value))


class DeliveryOrder(BaseModel):
    """One event to send: what the ledger pushes and the delivery worker receives."""

    job_id: str
    event: EventType
    webhook_id: str
    occurred_at: float
    attempt: int = Field(default=1, ge=1, description="attempt number within this series")
    manual: bool = Field(default=False, description="a redelivery the client asked for")

    def retry(self) -> DeliveryOrder:
        """The order for the next attempt of this series."""
        return self.model_copy(update={"attempt": self.attempt + 1})


Outcome = Literal["delivered", "retrying", "gave_up", "gone", "refused", "skipped"]


class DeliveryRecord(BaseModel):
    """One attempt as the job's delivery log shows it."""

    event: EventType
    webhook_id: str
    attempt: int
    at: datetime
    outcome: Outcome
    status_code: int | None = None
    error: str | None = None
    next_retry_at: datetime | None = None


class WebhookView(BaseModel):
    """A job's webhook as the API returns it (the secret is never shown)."""

    url: str
    events: list[EventType]
    deliveries: list[DeliveryRecord] = Field(default_factory=list)


def payload(order: DeliveryOrder, job: Mapping[str, Any], tenant: str) -> bytes:
    """The body of a delivery: `{"type", "timestamp", "tenant", "data": <job JSON>}`, compact.

    The tenant is named so that a receiver serving several tenants can tell whose event it is
    (and check it against the secret that verified it).
    """
    when = datetime.fromtimestamp(order.occurred_at, UTC).isoformat().replace("+00:00", "Z")
    body = {"type": order.event.value, "timestamp": when, "tenant": tenant, "data": job}
    return json.dumps(body, separators=(",", ":")).encode()
