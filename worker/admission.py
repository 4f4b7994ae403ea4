"""Admission at step granularity: which waiting jobs join the running loop at a step boundary.

Pure functions of what waits, what runs and the budget, so they are tested table-style with no
model. Jobs are served by priority, then arrival; a job that does not fit holds the line behind it
(no overtaking, so a large job is never starved by a stream of small ones), except that a job
strictly more urgent than some running ones may park them: a parked job keeps its latents and
scheduler state and rejoins later, exactly where it stopped. The row budget of one denoiser call
adapts to measured step times: it grows only while doubling the rows still cuts the time per row.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum


class Priority(IntEnum):
    """How urgent a job is; a lower value is served first."""

    HIGH = 0  # joins at the next step boundary, parking less urgent rows if it must
    NORMAL = 1
    LOW = 2


@dataclass(frozen=True)
class Seat:
    """A job as admission sees it, waiting or running."""

    job_id: str
    key: Hashable  # the loop key: only jobs with equal keys share a denoiser call
    priority: Priority
    since: float  # waiting: when it arrived; running: when it was admitted
    rows: int  # denoiser rows: two per image with guidance, one without
    pixels: int  # pixels of one row (width x height)

    @property
    def area(self) -> int:
        """Rows times pixels: what the pixel budget counts."""
        return self.rows * self.pixels


@dataclass(frozen=True)
class Budget:
    """What may run at once."""

    max_rows: int  # denoiser rows of all running jobs
    max_pixels: int  # rows x pixels of all running jobs
    call_rows: Mapping[Hashable, int] = field(default_factory=dict)  # per key; absent: max_rows

    def rows_for(self, key: Hashable) -> int:
        """The most rows one denoiser call of `key` may hold."""
        return min(self.max_rows, self.call_rows.get(key, self.max_rows))


@dataclass(frozen=True)
class Admission:
    """What to do at this step boundary."""

    admit: tuple[str, ...] = ()  # join now, in this order
    park: tuple[str, ...] = ()  # leave the call for now, keeping their state


@dataclass
class _Load:
    """The rows and pixels running, as admission changes them."""

    rows: int = 0
    area: int = 0
    by_key: dict[Hashable, int] = field(default_factory=dict)
    seats: int = 0

    def add(self, seat: Seat, sign: int = 1) -> None:
        """Count `seat` in (or out, with sign -1)."""
        self.rows += sign * seat.rows
        self.area += sign * seat.area
        self.by_key[seat.key] = self.by_key.get(seat.key, 0) + sign * seat.rows
        self.seats += sign

    def fits(self, seat: Seat, budget: Budget) -> bool:
        """Whether `seat` fits beside what runs; on an empty loop anything fits (it runs alone)."""
        if self.seats == 0:
            return True
        return (
            self.rows + seat.rows <= budget.max_rows
            and self.area + seat.area <= budget.max_pixels
            and self.by_key.get(seat.key, 0) + seat.rows <= budget.rows_for(seat.key)
        )


def admit(
    waiting: Sequence[Seat], running: Sequence[Seat], budget: Budget, *, preempt: bool = True
) -> Admission:
    """The jobs that join at this boundary, and the running ones parked to make room."""
    load = _Load()
    for seat in running:
        load.add(seat)
    parkable = sorted(running, key=lambda s: (-s.priority, -s.since))
    admitted: list[str] = []
    parked: list[str] = []
    for seat in sorted(waiting, key=lambda s: (s.priority, s.since)):
        if not load.fits(seat, budget):
            victims = _victims(seat, parkable, load, budget) if preempt else None
            if victims is None:
                break  # the head of the line waits for room; nothing overtakes it
            for victim in victims:
                load.add(victim, -1)
                parkable.remove(victim)
                parked.append(victim.job_id)
        load.add(seat)
        admitted.append(seat.job_id)
    return Admission(tuple(admitted), tuple(parked))


def _victims(
    seat: Seat, parkable: Sequence[Seat], load: _Load, budget: Budget
) -> list[Seat] | None:
    """The fewest less urgent running jobs (least urgent, latest first) making room for `seat`."""
    trial = _Load(load.rows, load.area, dict(load.by_key), load.seats)
    victims: list[Seat] = []
    for victim in parkable:
        if victim.priority <= seat.priority:
            break  # sorted least urgent first: the rest are at least as urgent as `seat`
        trial.add(victim, -1)
        victims.append(victim)
        if trial.fits(seat, budget):
            return victims
    return None


def row_budget(step_s: Mapping[int, float], floor: int, ceiling: int, *, gain: float = 0.1) -> int:
    """The most rows one denoiser call should hold, from its measured step time by row count.

    A row count is worth it while its time per row is at least `gain` below that of the largest
    measured count at most half as large (a count with none to compare is given the benefit of
    the doubt). While no count has failed that test, the budget probes twice the largest count
    measured, so that larger calls get measured too.
    """
    proven = floor
    for rows in sorted(step_s):
        if rows <= proven:
            continue
        half = [m for m in step_s if m <= rows / 2]
        if half:  # with nothing to compare it with, a count counts as worth it until disproved
            base = max(half)
            if step_s[rows] / rows > (1 - gain) * step_s[base] / base:
                return max(floor, min(ceiling, proven))
        proven = rows
    return max(floor, min(ceiling, 2 * proven))


class StepTimes:
    """Smoothed denoiser time per call, by pixels per row and row count (loop thread only)."""

    def __init__(self, alpha: float = 0.2, min_samples: int = 3) -> None:
        self.alpha, self.min_samples = alpha, min_samples
        self._mean: dict[tuple[int, int], float] = {}
        self._count: dict[tuple[int, int], int] = {}

    def add(self, pixels: int, rows: int, seconds: float) -> None:
        """Fold one denoiser call in."""
        key = (pixels, rows)
        old = self._mean.get(key)
        self._mean[key] = seconds if old is None else old + self.alpha * (seconds - old)
        self._count[key] = self._count.get(key, 0) + 1

    def table(self, pixels: int) -> dict[int, float]:
        """Seconds per call by row count at `pixels`, for counts seen often enough to trust."""
        return {
            rows: mean
            for (px, rows), mean in self._mean.items()
            if px == pixels and self._count[(px, rows)] >= self.min_samples
        }
