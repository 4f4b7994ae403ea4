"""Batch formation: a pure function of what is waiting, the limits and the clock.

Called whenever the pipeline is free. It picks the bucket whose oldest job is oldest and takes up
to the row and pixel caps. The batch runs at once when it is full or when nothing more can arrive
for it (the broker is empty); otherwise it waits at most `timeout_s` from its oldest job's arrival.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from core.jobs import Bucket

T = TypeVar("T")


@dataclass(frozen=True)
class Pending(Generic[T]):
    """A job the worker holds and has not run yet."""

    job_id: str
    bucket: Bucket
    rows: int  # images it asks for
    arrived: float  # monotonic time the worker received it
    handle: T  # whatever the caller needs to ack or requeue it


@dataclass(frozen=True)
class Limits:
    """The caps of one pipeline call."""

    max_rows: int
    max_pixels: int
    timeout_s: float
    early_flush: bool = True

    def capacity(self, bucket: Bucket) -> int:
        """Rows of this bucket one call may hold (at least one)."""
        return max(1, min(self.max_rows, self.max_pixels // bucket.pixels))


@dataclass(frozen=True)
class Pick(Generic[T]):
    """What to do now: run `batch`, or wait until `wake_at` (None: until something arrives)."""

    batch: tuple[Pending[T], ...] = ()
    wake_at: float | None = None


def by_bucket(pending: Sequence[Pending[T]]) -> list[list[Pending[T]]]:
    """Pending jobs grouped by bucket, oldest group first, each group in arrival order."""
    groups: dict[Bucket, list[Pending[T]]] = {}
    for item in sorted(pending, key=lambda p: p.arrived):
        groups.setdefault(item.bucket, []).append(item)
    return list(groups.values())


def fill(group: Sequence[Pending[T]], capacity: int) -> tuple[tuple[Pending[T], ...], bool]:
    """Take jobs in arrival order up to `capacity` rows; say whether the batch is full."""
    taken: list[Pending[T]] = []
    rows = 0
    for item in group:
        if taken and rows + item.rows > capacity:
            return tuple(taken), True
        taken.append(item)
        rows += item.rows
    return tuple(taken), rows >= capacity


def pick(pending: Sequence[Pending[T]], limits: Limits, now: float, more_coming: bool) -> Pick[T]:
    """The batch to run now, or when to look again."""
    deadlines = []
    for group in by_bucket(pending):
        batch, full = fill(group, limits.capacity(group[0].bucket))
        deadline = group[0].arrived + limits.timeout_s
        flush_early = limits.early_flush and not more_coming
        if full or flush_early or now >= deadline:
            return Pick(batch=batch)
        deadlines.append(deadline)
    return Pick(wake_at=min(deadlines) if deadlines else None)
