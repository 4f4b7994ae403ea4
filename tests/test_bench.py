"""`dq bench --quick` end to end with tiny settings: the report's shape and its arithmetic.

Timings are never asserted (CI machines are shared and slow): only that every variant ran, that
the counts add up, and that the ratios are the ratios of the figures they summarize.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import pytest

from bench.__main__ import main
from bench.plan import make_plan
from bench.stages import Call, images_per_s, percentile, spread
from bench.variants import schedule

TINY = [
    "--quick",
    "--steps=2",
    "--batch=2",
    "--duration=1.5",
    "--warmup=0.5",
    "--repeats=2",
    "--fixed-timeout=0.5",
    "--load-fractions=0.5",
    "--gateway-clients=20",
    "--gateway-duration=0.5",
    "--gateway-rate=100",
    "--rounds=2",
]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> dict[str, Any]:
    """One quick run, shared by the checks below."""
    out = tmp_path_factory.mktemp("bench")
    assert main([*TINY, f"--out={out}", f"--model-cache={model_cache}"]) == 0
    data: dict[str, Any] = json.loads((out / "report.json").read_text())
    data["_out"] = str(out)
    return data


@pytest.mark.slow
def test_every_variant_ran_and_charts_exist(report: dict[str, Any]) -> None:
    ran = {(p["variant"], p["mode"], p["users"]) for p in report["points"]}
    assert ran >= {
        ("system", "closed", 1),
        ("system", "closed", 4),
        ("unbatched", "closed", 4),
        ("fixed", "closed", 1),
        ("peer", "closed", 1),
        ("peer", "closed", 4),
    }
    assert any(p["mode"] == "open" for p in report["points"])
    assert report["skipped"] == {}
    assert report["charts"] == ["users.png", "rate.png"]
    for name in report["charts"]:
        assert (Path(report["_out"]) / name).read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_counts_add_up(report: dict[str, Any]) -> None:
    for p in report["points"]:
        c = p["counts"]
        statuses = c["succeeded"] + c["failed"] + c["canceled"] + c["error"] + c["timeout"]
        assert statuses == c["jobs"] > 0, p
        assert c["error"] == c["timeout"] == c["failed"] == 0, p["errors"]
        assert c["jobs_in_calls"] == c["succeeded"], p  # each finished job in exactly one call
        assert 0 < c["in_window"] <= c["jobs"]
        assert c["calls"] <= c["succeeded"]
        if p["variant"] != "peer":
            assert p["stages_ms"]["e2e"]["n"] == c["in_window"], p


@pytest.mark.slow
def test_clients_long_poll_one_read_per_job(report: dict[str, Any]) -> None:
    assert report["plan"]["wait"] == "hold"
    for p in report["points"]:
        if p["variant"] != "peer":
            assert 1 <= p["polls_per_job"] <= 1.5, p  # the gateway answers when the job ends


@pytest.mark.slow
def test_batches_respect_their_caps(report: dict[str, Any]) -> None:
    for p in report["points"]:
        if p["batch_fill"] is not None:
            assert 0 < p["batch_fill"] <= 1
            cap = 1 if p["variant"] == "unbatched" else report["plan"]["batch"]
            assert p["mean_batch"] == pytest.approx(p["batch_fill"] * cap)


@pytest.mark.slow
def test_summary_is_the_ratio_of_its_figures(report: dict[str, Any]) -> None:
    s = report["summary"]
    # A sanity bound, not a timing target (a ratio off by a unit would be far past it): on a slow,
    # busy machine a one-second point moves a ratio a long way (1.58 x LitServe was seen). Outside
    # load that comes and goes between points can skew one past any bound; the report records it,
    # and the bound is checked only when it stayed within half a core.
    least, most = s["others_cores"]
    bound = 3.0 if most - least < 0.5 else math.inf
    for name in ("system_vs_direct", "batched_vs_unbatched", "direct_batch_gain", "vs_litserve"):
        assert 0 < s[name] <= bound, (name, s[name], s["others_cores"])
    assert s["system_vs_direct"] == pytest.approx(
        s["system_images_per_s"] / s["direct_images_per_s"]
    )
    # Against the unbatched system and the peer: the median of each round's paired ratio.
    sat = max(report["plan"]["users"])

    def by_round(variant: str) -> dict[int, float]:
        return {
            p["round"]: p["images_per_s"]
            for p in report["points"]
            if (p["variant"], p["mode"], p["users"]) == (variant, "closed", sat)
        }

    for name, other in (("batched_vs_unbatched", "unbatched"), ("vs_litserve", "peer")):
        mine, theirs = by_round("system"), by_round(other)
        assert sorted(mine) == sorted(theirs) == [0, 1]
        ratios = [mine[r] / theirs[r] for r in mine]
        assert s[name] == pytest.approx(statistics.median(ratios)), name
    assert s["lone_p50_minus_direct_ms"] == pytest.approx(s["lone_p50_ms"] - s["direct_single_ms"])
    assert s["gateway_submits_per_s"] > 0
    assert {t["name"] for t in report["targets"]} == {
        "system_vs_direct",
        "batched_vs_unbatched",
        "lone_p50_minus_direct_ms",
        "gateway_submits_per_s",
        "vs_litserve",
    }


@pytest.mark.slow
def test_report_names_machine_model_and_sharing(report: dict[str, Any]) -> None:
    assert report["machine"]["cores"] >= 1
    assert report["versions"]["packages"]["torch"]
    assert report["model"] | {"config_hash": None} == {
        "name": "tiny",
        "config_hash": None,
        "width": 64,
        "height": 64,
        "steps": 2,
        "guidance_scale": 7.5,
        "dtype": "float32",
        "device": "cpu",
    }
    assert report["cpu_sharing"]["model_threads"] == 1
    gateway = report["gateway"]
    assert gateway["capacity"]["requests"] > 0
    assert gateway["poll"]["requests"] > 0


def test_schedule_puts_saturation_first() -> None:
    plan = make_plan("quick", Path("out"), Path("cache"), batch=4)
    assert schedule(plan) == [
        ("system", 8),
        ("unbatched", 8),
        ("peer", 8),
        ("system", 1),
        ("fixed", 1),
        ("peer", 1),
    ]


def test_throughput_counts_whole_calls() -> None:
    calls = [Call(str(i), "w", i - 0.5, float(i), 4, 4, 4) for i in range(1, 6)]
    # Five calls of 4 images ending a second apart: 16 images between the first and last end.
    assert images_per_s(calls, (0.0, 10.0)) == pytest.approx(4.0)
    assert images_per_s(calls[:1], (0.0, 2.0)) == pytest.approx(2.0)
    assert images_per_s([], (0.0, 1.0)) is None


def test_percentiles_interpolate() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    s = spread([3.0, 1.0, 2.0], scale=1000)
    assert (s.n, s.min, s.p50, s.max) == (3, 1000.0, 2000.0, 3000.0)
    assert spread([]).p50 is None
    assert math.isclose(s.mean or 0, 2000.0)


GPU_ON_CPU = [
    "--gpu",
    "--device=cpu",
    "--model=tiny",
    "--dtype=fp32",
    "--size=64",
    "--steps=2",
    "--threads=1",
    "--gpu-batches=1,2",
    "--duration=1.5",
    "--warmup=0.5",
    "--repeats=2",
    "--no-compile",
]


@pytest.mark.slow
def test_gpu_mode_runs_its_steps_on_the_cpu_when_told(tmp_path: Path, model_cache: Path) -> None:
    assert main([*GPU_ON_CPU, f"--out={tmp_path}", f"--model-cache={model_cache}"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["card"].startswith("cpu: ")
    assert report["machine"]["gpu"] is None
    eager = report["direct_eager"]
    assert [p["batch_size"] for p in eager["points"]] == [1, 2]
    assert (report["direct_compiled"], report["compile_error"]) == (None, None)
    # Each max batch size: a lone user and two batches' worth; the largest also the 40 users.
    by_batch = {s["max_batch_size"]: s for s in report["system"]}
    assert {b: [p["users"] for p in s["points"]] for b, s in by_batch.items()} == {
        1: [1, 2],
        2: [1, 4, 40],
    }
    for s in report["system"]:
        best = max(p["images_per_s"] for p in s["points"])
        direct = next(p for p in eager["points"] if p["batch_size"] == s["max_batch_size"])
        assert s["vs_direct_eager"] == pytest.approx(best / direct["images_per_s"])
        for p in s["points"]:
            assert p["counts"]["succeeded"] > 0
            assert p["errors"] == []
            assert p["counts"]["jobs_in_calls"] == p["counts"]["succeeded"]
    targets = {t["name"]: t for t in report["targets"]}
    assert set(targets) == {
        "system_vs_direct_batch2",
        "batch2_vs_batch1_eager",
        "eager_images_per_s_batch2",
        "compiled_images_per_s_batch2",
        "e2e_p99_ms_at_40_users",
    }
    assert targets["compiled_images_per_s_batch2"]["met"] is None
    crowd = by_batch[2]["points"][2]["stages_ms"]["e2e"]["p99"]
    assert targets["e2e_p99_ms_at_40_users"]["value"] == pytest.approx(crowd)


def test_gpu_mode_without_cuda_says_so_and_writes_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with caplog.at_level("WARNING"):
        assert main(["--gpu", f"--out={tmp_path}"]) == 0
    assert "torch sees no CUDA device" in caplog.text
    assert not (tmp_path / "report.json").exists()
