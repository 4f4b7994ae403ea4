"""The report: every figure of a run in one JSON document, the summary ratios and the targets."""

from __future__ import annotations

import statistics
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel

from bench.burst import BurstResult
from bench.direct import DirectResult
from bench.machine import Machine, Versions
from bench.plan import Plan, Served
from bench.points import Point

SCHEMA = 1
# Targets for the tiny model on a 2-core CPU machine (shared/BENCHMARKS.md).
LONE_SLACK_MS = 50.0
GATEWAY_SUBMITS_PER_S = 1500.0
GATEWAY_P99_MS = 25.0


class ModelInfo(BaseModel):
    """What was run, and how."""

    name: str
    config_hash: str | None
    width: int
    height: int
    steps: int
    guidance_scale: float
    dtype: str
    device: str


class CpuSharing(BaseModel):
    """How the cores were shared between the model and everything else."""

    cores: int
    model_threads: int | None
    note: str


class Summary(BaseModel):
    """The ratios the targets are about (None where a variant did not run)."""

    direct_single_ms: float | None = None
    direct_batch_ms: float | None = None
    direct_images_per_s: float | None = None  # at the max batch size
    direct_batch_gain: float | None = None  # direct images/s at max batch over batch 1
    system_images_per_s: float | None = None  # the batched system at saturation
    system_vs_direct: float | None = None
    system_model_ms: float | None = None  # p50 pipeline call inside the system at saturation
    unbatched_images_per_s: float | None = None
    batched_vs_unbatched: float | None = None  # the median over rounds of each round's ratio
    lone_p50_ms: float | None = None
    lone_p50_minus_direct_ms: float | None = None
    # lone_p50 - direct_single = (lone_model - direct_single) + batch wait + overhead, roughly:
    # the model running slower beside the gateway, versus the plumbing itself.
    lone_model_p50_ms: float | None = None
    lone_batch_wait_p50_ms: float | None = None
    lone_overhead_p50_ms: float | None = None
    fixed_lone_p50_ms: float | None = None
    fixed_lone_p50_minus_direct_ms: float | None = None
    peer_images_per_s: float | None = None
    peer_lone_p50_ms: float | None = None
    vs_litserve: float | None = None  # the median over rounds of each round's ratio
    # The same ratios in images per serving CPU-second: steadier when other users of the machine
    # take a varying share of the cores (see each point's cpu_cores.others).
    system_vs_direct_per_core: float | None = None
    batched_vs_unbatched_per_core: float | None = None
    vs_litserve_per_core: float | None = None
    others_cores: tuple[float, float] | None = None  # least and most, over the points
    gateway_submits_per_s: float | None = None  # capacity: clients submitting back to back
    gateway_paced_per_s: float | None = None  # achieved at the paced rate
    gateway_submit_p99_ms: float | None = None  # at the paced rate
    gateway_polls_per_s: float | None = None


class Target(BaseModel):
    """One target, its measured value, and whether it was met."""

    name: str
    value: float | None
    target: str
    met: bool | None  # None: not measured


class Report(BaseModel):
    """One run of `dq bench`."""

    schema_version: int = SCHEMA
    created_at: datetime
    command: list[str]
    plan: Plan
    machine: Machine
    versions: Versions
    model: ModelInfo
    cpu_sharing: CpuSharing
    direct: DirectResult | None
    points: list[Point]
    gateway: BurstResult | None
    summary: Summary
    targets: list[Target]
    charts: list[str]
    skipped: dict[str, str]  # variant -> why it did not run
    wall_s: float


def saturation(points: list[Point], variant: Served, users: int) -> Point | None:
    """The closed-loop load of `variant` with the most images/s, at `users` users or more."""
    # Only saturating loads count: a lone user's batches of one are not the batch size compared.
    mine = [p for p in points if p.variant == variant and p.mode == "closed" and p.images_per_s]
    loaded = [p for p in mine if (p.users or 0) >= users] or mine
    rounds: dict[int | None, list[Point]] = {}
    for p in loaded:
        rounds.setdefault(p.users, []).append(p)
    return max(
        map(median_round, rounds.values()), key=lambda p: p.images_per_s or 0.0, default=None
    )


def median_round(points: list[Point]) -> Point:
    """The round with the median images/s (the lower of two)."""
    ordered = sorted(points, key=lambda p: p.images_per_s or 0.0)
    return ordered[(len(ordered) - 1) // 2]


def paired(points: list[Point], a: Served, b: Served, users: int | None) -> float | None:
    """The median over rounds of a's images/s over b's, both at `users` users.

    Each round takes the variants one after the other within a minute, so a drift in the
    machine's background load lands on both sides of each round's ratio.
    """
    rates: dict[Served, dict[int, float]] = {a: {}, b: {}}
    for p in points:
        if p.variant in rates and p.mode == "closed" and p.users == users and p.images_per_s:
            rates[p.variant][p.round] = p.images_per_s
    ratios = [rates[a][r] / rates[b][r] for r in rates[a].keys() & rates[b].keys()]
    return statistics.median(ratios) if ratios else None


def lone(points: list[Point], variant: Served) -> Point | None:
    """The one-user point of `variant`."""
    return next((p for p in points if p.variant == variant and p.users == 1), None)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _minus(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def _rate(point: Point | None) -> float | None:
    return point.images_per_s if point else None


def _per_core(point: Point | None) -> float | None:
    return point.images_per_core_s if point else None


def _others(points: list[Point]) -> tuple[float, float] | None:
    loads = [p.cpu_cores["others"] for p in points if "others" in p.cpu_cores]
    return (min(loads), max(loads)) if loads else None


def _p50(point: Point | None, stage: str = "e2e") -> float | None:
    spread = point.stages_ms.get(stage) if point else None
    return spread.p50 if spread else None


def summarize(
    plan: Plan, direct: DirectResult | None, points: list[Point], burst: BurstResult | None
) -> Summary:
    """The summary ratios."""
    one = direct.point(1) if direct else None
    full = direct.point(plan.batch) if direct else None
    single_ms = one.seconds.p50 * 1000 if one and one.seconds.p50 else None
    sat = plan.saturation_users
    at_sat = saturation(points, "system", sat)
    sat_users = at_sat.users if at_sat else None
    system = _rate(at_sat)
    alone = lone(points, "system")
    unbatched = _rate(saturation(points, "unbatched", sat))
    peer = _rate(saturation(points, "peer", sat))
    direct_rate = full.images_per_s if full else None
    return Summary(
        direct_single_ms=single_ms,
        direct_batch_ms=full.seconds.p50 * 1000 if full and full.seconds.p50 else None,
        direct_images_per_s=direct_rate,
        direct_batch_gain=_ratio(direct_rate, one.images_per_s if one else None),
        system_images_per_s=system,
        system_vs_direct=_ratio(system, direct_rate),
        system_model_ms=_p50(at_sat, "model"),
        unbatched_images_per_s=unbatched,
        batched_vs_unbatched=paired(points, "system", "unbatched", sat_users)
        or _ratio(system, unbatched),
        lone_p50_ms=_p50(alone),
        lone_p50_minus_direct_ms=_minus(_p50(alone), single_ms),
        lone_model_p50_ms=_p50(alone, "model"),
        lone_batch_wait_p50_ms=_p50(alone, "batch_wait"),
        lone_overhead_p50_ms=_p50(alone, "overhead"),
        fixed_lone_p50_ms=_p50(lone(points, "fixed")),
        fixed_lone_p50_minus_direct_ms=_minus(_p50(lone(points, "fixed")), single_ms),
        peer_images_per_s=peer,
        peer_lone_p50_ms=_p50(lone(points, "peer")),
        vs_litserve=paired(points, "system", "peer", sat_users) or _ratio(system, peer),
        system_vs_direct_per_core=_ratio(
            _per_core(at_sat), full.images_per_core_s if full else None
        ),
        batched_vs_unbatched_per_core=_ratio(
            _per_core(at_sat), _per_core(saturation(points, "unbatched", sat))
        ),
        vs_litserve_per_core=_ratio(_per_core(at_sat), _per_core(saturation(points, "peer", sat))),
        others_cores=_others(points),
        gateway_submits_per_s=burst.capacity.per_s if burst else None,
        gateway_paced_per_s=burst.paced.per_s if burst else None,
        gateway_submit_p99_ms=burst.paced.latency_ms.p99 if burst else None,
        gateway_polls_per_s=burst.poll.per_s if burst else None,
    )


def _at_least(name: str, value: float | None, floor: float | None, text: str) -> Target:
    met = None if value is None or floor is None else value >= floor
    return Target(name=name, value=value, target=text, met=met)


def _at_most(name: str, value: float | None, ceiling: float, text: str) -> Target:
    return Target(
        name=name, value=value, target=text, met=None if value is None else value <= ceiling
    )


def targets(s: Summary) -> list[Target]:
    """The CPU targets of shared/BENCHMARKS.md, each met or missed."""
    gain = s.direct_batch_gain
    gateway_ok = None
    if s.gateway_paced_per_s is not None and s.gateway_submit_p99_ms is not None:
        gateway_ok = (
            s.gateway_paced_per_s >= 0.98 * GATEWAY_SUBMITS_PER_S
            and s.gateway_submit_p99_ms <= GATEWAY_P99_MS
        )
    return [
        _at_least("system_vs_direct", s.system_vs_direct, 0.90, ">= 0.90"),
        _at_least(
            "batched_vs_unbatched",
            s.batched_vs_unbatched,
            None if gain is None else 0.9 * gain,
            ">= 0.9 x direct_batch_gain" + ("" if gain is None else f" = {0.9 * gain:.3f}"),
        ),
        _at_most("lone_p50_minus_direct_ms", s.lone_p50_minus_direct_ms, LONE_SLACK_MS, "<= 50 ms"),
        Target(
            name="gateway_submits_per_s",
            value=s.gateway_submits_per_s,
            target=">= 1500/s, p99 <= 25 ms at 1500/s offered over 300 clients",
            met=gateway_ok,
        ),
        _at_least("vs_litserve", s.vs_litserve, 1.0, ">= 1.0"),
    ]


def created_now() -> datetime:
    """The report's timestamp."""
    return datetime.now(UTC)


def write(report: Report, folder: Path) -> Path:
    """Write `report.json` into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "report.json"
    path.write_text(report.model_dump_json(indent=2) + "\n")
    return path
