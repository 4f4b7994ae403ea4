"""bench.steps: the step engine's micro-benchmark runs end to end on the tiny model."""

from __future__ import annotations

from pathlib import Path

from bench.steps import main, run_step_bench, table


def test_the_bench_measures_the_curve_and_the_throughput_check(model_cache: Path) -> None:
    result = run_step_bench(
        "tiny", model_cache, device="cpu", rows=(1, 2, 3), repeats=2, batch=2, steps=2, threads=1
    )
    assert [p.rows for p in result.curve] == [1, 2, 3]
    assert [p.jobs for p in result.curve] == [1, 1, 2]
    for point in result.curve:
        assert 0 < point.denoise_ms <= point.step_ms
        assert 0 <= point.outside_share < 1
    assert result.check is not None
    assert result.check.batch == 2
    assert result.check.max_distance <= 1.0  # the engine's images are the pipeline call's
    text = table(result)
    assert "outside" in text
    assert "step engine" in text


def test_the_command_writes_json(model_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "steps.json"
    argv = ["--model-cache", str(model_cache), "--rows", "1,2", "--repeats", "1", "--batch", "0"]
    assert main([*argv, "--json", str(out)]) == 0
    assert '"curve"' in out.read_text()
