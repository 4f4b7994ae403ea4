"""`dq bench --engines` end to end, briefly: every engine at every load, the figures and chart.

Timings are never asserted (the machine is shared): only that every point ran without errors on
the mixed traffic, that the open-loop rates are the fractions of the batch engine's saturation,
and that the summary is the ratios of the figures it summarizes.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from bench.__main__ import main
from bench.engines import mixed
from bench.plan import make_plan

BRIEF = ["--engines", "--duration=3", "--warmup=0.5", "--rounds=1", "--load-fractions=0.5,0.8"]


def test_the_mix_is_three_step_counts_two_scales_and_30_percent_at_another_size() -> None:
    kinds = mixed(make_plan("quick", Path("out"), Path("cache")))
    assert Counter(k["steps"] for k in kinds) == {4: 20, 8: 20, 16: 20}
    assert Counter(k["guidance_scale"] for k in kinds) == {7.5: 30, 3.0: 30}
    assert Counter(k.get("width", 64) for k in kinds) == {64: 42, 96: 18}


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b as the summary rounds it; None without both."""
    return round(a / b, 3) if a is not None and b else None


@pytest.mark.slow
def test_every_engine_runs_every_load_and_the_summary_adds_up(
    tmp_path: Path, model_cache: Path
) -> None:
    assert main([*BRIEF, f"--out={tmp_path}", f"--model-cache={model_cache}"]) == 0
    report = json.loads((tmp_path / "engines.json").read_text())
    points = report["points"]
    assert {(p["engine"], p["kind"]) for p in points} == {
        (e, k) for e in ("step", "batch", "peer") for k in ("saturation", "lone", "load")
    }
    assert report["skipped"] == {}
    assert all(p["errors"] == 0 for p in points), [p for p in points if p["errors"]]
    # So brief a run takes few jobs at the open-loop rates (a job or two a second on 2 cores).
    assert all(p["succeeded"] > 0 for p in points if p["kind"] != "load")
    saturated = [p for p in points if p["kind"] == "saturation"]
    kinds = {steps for p in points for steps in p["p95_ms_by_steps"]}
    # Figures by kind for the kinds that ran (the mix itself is checked above, without a run: so
    # brief a run on a slow machine may finish jobs of one kind only).
    assert kinds
    assert kinds <= {"4", "8", "16"}
    sat = {p["engine"]: p["images_per_s"] for p in saturated}
    loads = [p for p in points if p["kind"] == "load"]
    assert {(p["fraction"], p["rate"]) for p in loads} == {
        (f, round(f * sat["batch"], 3)) for f in (0.5, 0.8)
    }
    summary = report["summary"]
    # A figure may be missing where so brief a point ended no call after its warm-up (16-step jobs
    # on a slow machine): its ratio is then None, never a guess.
    assert summary["step_vs_batch_saturation"] == ratio(sat["step"], sat["batch"])
    p95 = {p["engine"]: p["e2e_ms"]["p95"] for p in loads if p["fraction"] == 0.8}
    assert summary["step_vs_batch_p95_at_80"] == ratio(p95["step"], p95["batch"])
    lone = {p["engine"]: p["e2e_ms"]["p50"] for p in points if p["kind"] == "lone"}
    both = lone["step"] is not None and lone["batch"] is not None
    gap = round(lone["step"] - lone["batch"], 1) if both else None
    assert summary["lone_step_minus_batch_ms"] == gap
    assert set(summary["goals"].values()) <= {True, False, None}
    assert report["machine"]["cores"] >= 1
    assert (tmp_path / "engines.png").stat().st_size > 0
