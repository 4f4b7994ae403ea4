"""What a finished attempt leaves in its job's trace, and what its batch adds to the metrics.

The spans are made after the fact, from the times the worker and the record already hold (so
tracing costs the batch nothing while it runs): the queue wait, the batch (its id and size) and,
under it, the model call and the storing of the images. Jobs that share a pipeline call each get
the call in their own trace, with the same batch id.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.exceptions import RedisError

from core import metrics
from core.jobs import ErrorInfo
from core.records import JobRecord
from core.tracing import Tracing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Call:
    """The pipeline call that made a job's images."""

    batch_id: str
    rows: int
    start: float  # epoch seconds
    end: float


def job_spans(
    tracing: Tracing,
    record: JobRecord,
    attempt: tuple[int, float, str],
    fields: Mapping[str, Any],
    call: Call | None,
) -> None:
    """The spans of an attempt (number, claimed at, worker) that ended with `fields` (its
    finishing change's), and `call`, the pipeline call, if it got that far."""
    if not tracing.on or not record.trace:
        return
    number, claimed, worker = attempt
    finished = float(fields.get("finished_at") or claimed)
    error = fields.get("error")
    failure = error.code if isinstance(error, ErrorInfo) else None
    ids: dict[str, str | int] = {"dq.job_id": record.id, "dq.attempt": number}
    tracing.record("dq.queue", parent=record.trace, start=record.created_at, end=claimed)
    batch_attributes: dict[str, str | int] = {**ids, "dq.worker": worker}
    if call is not None:
        batch_attributes |= {"dq.batch.id": call.batch_id, "dq.batch.size": call.rows}
    batch = tracing.record(
        "dq.batch",
        parent=record.trace,
        start=claimed,
        end=finished,
        attributes=batch_attributes,
        error=failure,
    )
    if call is None:
        return
    tracing.record("dq.model", parent=batch, start=call.start, end=call.end)
    tracing.record("dq.storage", parent=batch, start=call.end, end=finished, error=failure)


def call_sizes(rows: int, capacity: int) -> list[int]:
    """The rows of each pipeline call a group of `rows` took (`capacity` at most each)."""
    if capacity <= 0:
        return [rows]
    full, rest = divmod(rows, capacity)
    return [capacity] * full + ([rest] if rest else [])


def count_calls(redis: Redis, model: str, rows: int, capacity: int) -> None:
    """Add a group's pipeline calls to the batch size and fill histograms (best effort)."""
    pipe = redis.pipeline(transaction=False)
    for size in call_sizes(rows, capacity):
        metrics.observe(pipe, "batch_size", model, size)
        metrics.observe(pipe, "batch_fill", model, size / max(capacity, size))
    try:
        pipe.execute()
    except RedisError as e:
        log.warning("batch metrics not written (Redis: %s)", e)
