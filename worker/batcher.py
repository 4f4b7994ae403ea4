"""Batch formation: a pure function of what is waiting, the limits and the clock.

Called whenever the pipeline is free. It picks the bucket whose oldest job is oldest and takes up
to the row and pixel caps, in the order given (arrival, or `fair_order`'s under fair dispatch).
The batch runs at once when it is full or when nothing more can arrive for it (the broker is
empty); otherwise it waits at most `timeout_s` from its oldest job's arrival.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
    tenant: str = ""
    priority: int = 1  # its class's place in keys.CLASSES: 0 high, 1 normal, 2 low


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


def fair_order(
    pending: Sequence[Pending[T]], held: Mapping[str, int] | None = None
) -> list[Pending[T]]:
    """Pending jobs in the order a worker under fair dispatch takes them: priority class first;
    within a class, the tenant holding the fewest jobs here (`held`: running, plus those this
    order placed before), then arrival.

    The ledger dispatches in fair order, but a worker holds the few jobs of its window at once,
    received in the order they went out: a light tenant's job dispatched just after a flood's
    would wait behind them. Taken in this order, it goes next. Over time the flood loses nothing
    (the ledger still decides how much of each tenant goes out); only the window is reordered.
    """
    counts = dict(held or {})
    left = sorted(pending, key=lambda p: p.arrived)
    order: list[Pending[T]] = []
    while left:
        best = min(left, key=lambda p: (p.priority, counts.get(p.tenant, 0)))  # ties: arrival
        left.remove(best)
        order.append(best)
        counts[best.tenant] = counts.get(best.tenant, 0) + 1
    return order


def by_bucket(pending: Sequence[Pending[T]]) -> list[list[Pending[T]]]:
    """Pending jobs grouped by bucket, the group with the oldest job first, each group in the
    order given."""
    groups: dict[Bucket, list[Pending[T]]] = {}
    for item in pending:
        groups.setdefault(item.bucket, []).append(item)
    return sorted(groups.values(), key=lambda group: min(p.arrived for p in group))


def fill(group: Sequence[Pending[T]], capacity: int) -> tuple[tuple[Pending[T], ...], bool]:
    """Take jobs in order up to `capacity` rows; say whether the batch is full."""
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
        deadline = min(p.arrived for p in group) + limits.timeout_s
        flush_early = limits.early_flush and not more_coming
        if full or flush_early or now >= deadline:
            return Pick(batch=batch)
        deadlines.append(deadline)
    return Pick(wake_at=min(deadlines) if deadlines else None)
