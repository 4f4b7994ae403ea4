"""A load point's figures: throughput, batch fill, latency per stage, and who used the CPU."""

from __future__ import annotations

from collections import Counter
from typing import Literal

from pydantic import BaseModel

from bench import stages
from bench.load import LoadResult, Sample
from bench.plan import Served
from bench.stages import Spread


class Counts(BaseModel):
    """What became of the jobs; the statuses add up to `jobs`."""

    jobs: int
    succeeded: int = 0
    failed: int = 0
    canceled: int = 0
    error: int = 0
    timeout: int = 0
    in_window: int  # submitted after the warm-up and before the end: the latency sample
    calls: int  # pipeline calls (batches) behind the succeeded jobs
    jobs_in_calls: int  # succeeded jobs attributed to a call: equals `succeeded` for the system


class Point(BaseModel):
    """One variant under one load."""

    variant: Served
    round: int = 0  # saturation points are taken in turn, round after round
    mode: Literal["closed", "open"]
    users: int | None
    rate: float | None  # offered arrivals/s (open loop)
    duration_s: float
    window_s: tuple[float, float]  # measured window, seconds from the start
    counts: Counts
    images_per_s: float | None
    # Images per CPU-second the serving processes got (all but the load generator): the figure
    # that the machine's other users cannot move, since it divides out the cores they left us.
    images_per_core_s: float | None
    batch_fill: float | None  # mean rows per call / max batch size
    mean_batch: float | None
    stages_ms: dict[str, Spread]
    polls_per_job: float | None  # status reads per finished job (the gateway's polling load)
    cpu_cores: dict[str, float]  # cores used per role during the point
    errors: list[str]  # the first few, verbatim


def counts_of(
    samples: list[Sample], window: tuple[float, float], calls: list[stages.Call]
) -> Counts:
    """Statuses, the latency sample's size and the calls behind the jobs."""
    status = Counter(s.status for s in samples)
    known = ("succeeded", "failed", "canceled", "error", "timeout")
    by_status = {k: status.get(k, 0) for k in known}
    # Any other status (a job the generator left unfinished) counts as an error.
    by_status["error"] += sum(n for k, n in status.items() if k not in known)
    return Counts(
        jobs=len(samples),
        **by_status,
        in_window=sum(window[0] <= s.submit <= window[1] for s in samples),
        calls=len(calls),
        jobs_in_calls=sum(c.jobs for c in calls),
    )


def _per_core(rate: float | None, cpu: dict[str, float]) -> float | None:
    serving = sum(v for role, v in cpu.items() if role in ("gateway", "worker", "redis", "peer"))
    return rate / serving if rate and serving > 0 else None


def _mean(values: list[int]) -> float | None:
    return sum(values) / len(values) if values else None


def point_of(
    variant: Served,
    result: LoadResult,
    *,
    max_batch: int,
    warmup_s: float,
    cpu: dict[str, float],
    round_: int = 0,
) -> Point:
    """The figures of one load point."""
    spec, samples = result.spec, result.samples
    window = (result.started + min(warmup_s, spec.duration_s / 2), result.ended)
    calls = stages.peer_calls(samples) if spec.protocol == "peer" else stages.calls_of(samples)
    measured = [s for s in samples if window[0] <= s.submit <= window[1]]
    inside = [c for c in calls if window[0] <= c.end <= window[1]]
    rate = stages.images_per_s(calls, window)
    return Point(
        variant=variant,
        round=round_,
        mode=spec.mode,
        users=spec.users or None,
        rate=spec.rate or None,
        duration_s=spec.duration_s,
        window_s=(window[0] - result.started, window[1] - result.started),
        counts=counts_of(samples, window, calls),
        images_per_s=rate,
        images_per_core_s=_per_core(rate, cpu),
        batch_fill=stages.fill_ratio(calls, window, max_batch),
        mean_batch=sum(c.rows for c in inside) / len(inside) if inside else None,
        stages_ms=stages.stage_spreads(measured, calls),
        polls_per_job=_mean([s.polls for s in measured if s.done is not None]),
        cpu_cores=cpu,
        errors=[s.error for s in samples if s.error][:5],
    )
