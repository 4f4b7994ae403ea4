"""The figures of `dq bench --engines`: a point's latency and throughput, the summary's ratios
against the goals, and the table printed at the end (pure functions of the load results)."""

from __future__ import annotations

from collections.abc import Sequence
from statistics import median as _median
from typing import Any, Literal

from pydantic import BaseModel

from bench import stages
from bench.load import LoadResult
from bench.stages import Spread, spread

Engine = Literal["step", "batch", "peer"]
ENGINES: tuple[Engine, ...] = ("step", "batch", "peer")

# The step engine's goals against the batch engine (issue 16).
P95_AT_80 = 0.6  # p95 end to end at 80 % load: at most this share of the batch engine's
SATURATION = 1.0  # images/s at saturation: at least the batch engine's
LONE_MS = 15.0  # a lone job's end to end: at most this much slower


class EnginePoint(BaseModel):
    """One server under one load."""

    engine: Engine
    kind: Literal["saturation", "lone", "load"]
    round: int = 0
    users: int | None = None
    fraction: float | None = None  # of the reference load
    rate: float | None = None  # offered jobs/s (open loop)
    window_s: float
    jobs: int
    succeeded: int
    errors: int  # failed, timed out, or an HTTP error
    images_per_s: float | None
    e2e_ms: Spread  # jobs submitted inside the measured window
    p95_ms_by_steps: dict[int, float | None]
    # Cores used per role; `others`: load from outside the bench (the machine's other users).
    cpu_cores: dict[str, float] = {}


def figures(
    engine: Engine,
    kind: Literal["saturation", "lone", "load"],
    result: LoadResult,
    warmup_s: float,
    *,
    round_: int = 0,
    fraction: float | None = None,
) -> EnginePoint:
    """The figures of one point: throughput over whole calls, latency of the jobs in the window."""
    spec, samples = result.spec, result.samples
    window = (result.started + min(warmup_s, spec.duration_s / 2), result.ended)
    calls = stages.peer_calls(samples) if spec.protocol == "peer" else stages.calls_of(samples)
    done = [s for s in samples if s.status == "succeeded" and s.done is not None]
    measured = [s for s in done if window[0] <= s.submit <= window[1]]
    by_steps: dict[int, list[float]] = {}
    for s in measured:
        by_steps.setdefault(s.steps or 0, []).append((s.done or s.submit) - s.submit)
    return EnginePoint(
        engine=engine,
        kind=kind,
        round=round_,
        users=spec.users or None,
        fraction=fraction,
        rate=spec.rate or None,
        window_s=round(window[1] - window[0], 2),
        jobs=len(samples),
        succeeded=len(done),
        errors=len(samples) - len(done),
        images_per_s=stages.images_per_s(calls, window),
        e2e_ms=spread([(s.done or s.submit) - s.submit for s in measured], 1000),
        p95_ms_by_steps={n: spread(v, 1000).p95 for n, v in sorted(by_steps.items())},
    )


def median(values: Sequence[float | None]) -> float | None:
    """The median of the known values."""
    known = [v for v in values if v is not None]
    return _median(known) if known else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def at_fraction(points: list[EnginePoint], engine: Engine, fraction: float) -> EnginePoint | None:
    """An engine's open-loop point nearest `fraction` of the reference load."""
    mine = [p for p in points if p.engine == engine and p.kind == "load" and p.fraction]
    return min(mine, key=lambda p: abs((p.fraction or 0) - fraction), default=None)


def summarize(points: list[EnginePoint]) -> dict[str, Any]:
    """The ratios and differences the goals are about, and whether each goal is met."""
    sat = {e: median([p.images_per_s for p in _of(points, e, "saturation")]) for e in ENGINES}
    lone = {e: median([p.e2e_ms.p50 for p in _of(points, e, "lone")]) for e in ENGINES}
    p95 = {e: (pt.e2e_ms.p95 if (pt := at_fraction(points, e, 0.8)) else None) for e in ENGINES}
    gap = None if lone["step"] is None or lone["batch"] is None else lone["step"] - lone["batch"]
    summary: dict[str, Any] = {
        "saturation_images_per_s": sat,
        "p95_ms_at_80": p95,
        "lone_p50_ms": lone,
        "step_vs_batch_p95_at_80": _ratio(p95["step"], p95["batch"]),
        "step_vs_batch_saturation": _ratio(sat["step"], sat["batch"]),
        "step_vs_peer_saturation": _ratio(sat["step"], sat["peer"]),
        "lone_step_minus_batch_ms": None if gap is None else round(gap, 1),
    }
    goals = (
        ("step_vs_batch_p95_at_80", "<=", P95_AT_80),
        ("step_vs_batch_saturation", ">=", SATURATION),
        ("lone_step_minus_batch_ms", "<=", LONE_MS),
    )
    summary["goals"] = {
        f"{name} {sense} {target:g}": _met(summary[name], sense, target)
        for name, sense, target in goals
    }
    return summary


def _of(points: list[EnginePoint], engine: Engine, kind: str) -> list[EnginePoint]:
    return [p for p in points if p.engine == engine and p.kind == kind]


def _met(value: float | None, sense: str, target: float) -> bool | None:
    if value is None:
        return None
    return value <= target if sense == "<=" else value >= target


VERDICTS = {True: "met", False: "MISSED", None: "not measured"}


def _others(point: EnginePoint) -> str:
    """Cores the machine's other users took during the point."""
    return fmt(point.cpu_cores.get("others"), ".2f")


def table(points: list[EnginePoint], summary: dict[str, Any]) -> str:
    """The figures as text: a line per point, then the ratios and the goals."""
    heads = ("images/s", "p50 ms", "p95 ms", "p99 ms", "jobs", "errors", "others")
    lines = [f"{'engine':6} {'load':>16} " + " ".join(f"{h:>8}" for h in heads)]
    for p in points:
        load = f"{p.fraction:.0%} {p.rate:.2f}/s" if p.kind == "load" else f"{p.kind} {p.users}u"
        e2e = p.e2e_ms
        cells = [
            fmt(p.images_per_s, ".2f"),
            *(fmt(v, ".0f") for v in (e2e.p50, e2e.p95, e2e.p99)),
        ]
        lines.append(
            f"{p.engine:6} {load:>16} "
            + " ".join(f"{c:>8}" for c in [*cells, p.jobs, p.errors, _others(p)])
        )
    names = ("step_vs_batch_p95_at_80", "step_vs_batch_saturation", "step_vs_peer_saturation")
    for name in (*names, "lone_step_minus_batch_ms"):
        lines.append(f"{name:28} {fmt(summary[name], '.3f')}")
    for goal, met in summary["goals"].items():
        lines.append(f"goal {goal:36} {VERDICTS[met]}")
    return "\n".join(lines)
