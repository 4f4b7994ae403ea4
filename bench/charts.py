"""PNG charts of a report: throughput and latency against load, one line per variant (or engine)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and in CI

import matplotlib.pyplot as plt

from bench.engine_figures import ENGINES, EnginePoint, median
from bench.plan import Plan
from bench.points import Point
from bench.report import Report, median_round

# One colour per variant in every chart.
COLOURS = {"system": "tab:blue", "unbatched": "tab:orange", "fixed": "tab:green", "peer": "tab:red"}
LABELS = {
    "system": "system (batched, early flush)",
    "unbatched": "system, max_batch_size=1",
    "fixed": "system, fixed timeout",
    "peer": "LitServe",
}


def _series(points: list[Point], mode: Literal["closed", "open"]) -> dict[str, list[Point]]:
    """Per variant, one point per load (the median round where there were several)."""
    loads: dict[str, dict[float, list[Point]]] = {}
    for p in points:
        if p.mode == mode and p.images_per_s is not None:
            loads.setdefault(p.variant, {}).setdefault(_x(p), []).append(p)
    return {v: [median_round(by_x[x]) for x in sorted(by_x)] for v, by_x in loads.items()}


def _x(point: Point) -> float:
    return float(point.users) if point.users is not None else point.rate or 0.0


def _latency(point: Point, which: str) -> float | None:
    spread = point.stages_ms.get("e2e")
    return None if spread is None else getattr(spread, which)


def _draw(axes: Any, lines: dict[str, list[Point]], report: Report) -> None:
    rate_ax, lat_ax = axes
    for variant, pts in lines.items():
        xs = [_x(p) for p in pts]
        colour = COLOURS[variant]
        rate_ax.plot(
            xs, [p.images_per_s for p in pts], marker="o", color=colour, label=LABELS[variant]
        )
        lat_ax.plot(xs, [_latency(p, "p50") for p in pts], marker="o", color=colour)
        lat_ax.plot(xs, [_latency(p, "p99") for p in pts], linestyle="--", color=colour)
    if report.summary.direct_images_per_s:
        rate_ax.axhline(
            report.summary.direct_images_per_s,
            color="black",
            linestyle=":",
            label=f"direct, batch {report.plan.batch}",
        )
    rate_ax.set_ylabel("images/s")
    lat_ax.set_ylabel("end-to-end latency, ms (solid p50, dashed p99)")
    lat_ax.set_yscale("log")
    rate_ax.legend(fontsize="small")


def chart(report: Report, mode: Literal["closed", "open"], path: Path) -> bool:
    """Draw one load mode's chart; False when the report has no point of that mode."""
    lines = _series(report.points, mode)
    if not lines:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    _draw(axes, lines, report)
    label = "concurrent users (closed loop)" if mode == "closed" else "offered jobs/s (open loop)"
    for ax in axes:
        ax.set_xlabel(label)
        ax.grid(True, alpha=0.3)
    m = report.model
    fig.suptitle(
        f"{m.name} {m.width}x{m.height}, {m.steps} steps, max batch {report.plan.batch}, "
        f"{report.plan.threads} model thread(s) — "
        f"{report.machine.cpu}, {report.machine.cores} cores"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def draw_all(report: Report, folder: Path) -> list[str]:
    """Every chart the report has data for; the file names written into `folder`."""
    written = []
    for mode, name in (("closed", "users.png"), ("open", "rate.png")):
        if chart(report, mode, folder / name):  # type: ignore[arg-type]
            written.append(name)
    return written


ENGINE_COLOURS = {"step": "tab:purple", "batch": "tab:blue", "peer": "tab:red"}
ENGINE_LABELS = {"step": "step engine", "batch": "batch engine", "peer": "LitServe"}


def engines_chart(points: list[EnginePoint], plan: Plan, path: Path) -> None:
    """`dq bench --engines`: latency and images/s against offered load, a colour per engine."""
    fig, (lat_ax, rate_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for engine in ENGINES:
        mine = [p for p in points if p.engine == engine]
        loads = sorted((p for p in mine if p.kind == "load"), key=lambda p: p.fraction or 0.0)
        colour, label = ENGINE_COLOURS[engine], ENGINE_LABELS[engine]
        xs = [100 * (p.fraction or 0.0) for p in loads]
        lat_ax.plot(xs, [p.e2e_ms.p50 for p in loads], marker="o", color=colour, label=label)
        lat_ax.plot(xs, [p.e2e_ms.p95 for p in loads], linestyle="--", color=colour)
        lat_ax.plot(xs, [p.e2e_ms.p99 for p in loads], linestyle=":", color=colour)
        rate_ax.plot(xs, [p.images_per_s for p in loads], marker="o", color=colour, label=label)
        saturated = median([p.images_per_s for p in mine if p.kind == "saturation"])
        if saturated:
            rate_ax.axhline(saturated, color=colour, linestyle=":", alpha=0.7)
    lat_ax.set_ylabel("end-to-end latency, ms (solid p50, dashed p95, dotted p99)")
    lat_ax.set_yscale("log")
    rate_ax.set_ylabel("images/s (dotted: at saturation)")
    for ax in (lat_ax, rate_ax):
        ax.set_xlabel("offered load, % of the batch engine's saturation throughput")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(
        f"{plan.model}, steps 4/8/16, guidance 7.5/3, 30 % at 1.5x {plan.width}x{plan.height}, "
        f"max batch {plan.batch}, {plan.threads} model thread(s)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
