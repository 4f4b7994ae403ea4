"""The step engine, measured directly (no queue, no gateway): `python -m bench.steps`.

Two figures:
- the denoiser curve: one loop step's time against the rows in it (guided jobs of two rows, plus
  one unguided row for odd counts), with the part of each step spent outside the denoiser call;
- a throughput check: a fixed batch through the step engine (all jobs submitted at once) against
  the same batch as one pipeline call, the way the batch engine runs it, with the images compared.

Runs the tiny model on the CPU in seconds; `run_step_bench(model="sd15-random", device="cuda",
width=512, height=512)` is the same on a GPU (what `dq bench --gpu` can call).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL.Image import Image
from pydantic import BaseModel

from core.jobs import Bucket
from worker.families import family_of
from worker.inference import Engine, Row
from worker.intake import Intake
from worker.loop import Loop, stopwatch_for
from worker.models import load_pipeline, set_cpu_threads
from worker.reports import StepReport
from worker.steps import LoopSettings, StepEngine
from worker.tracks import StepJob

log = logging.getLogger(__name__)

PROMPT = "a red fox in the snow"


class RowPoint(BaseModel):
    """One loop step at a row count (medians)."""

    rows: int
    jobs: int
    step_ms: float  # the whole `Loop.step` (on a GPU, until the GPU is done)
    denoise_ms: float  # its denoiser call
    ms_per_row: float
    outside_share: float  # of the step, outside the denoiser call


class ThroughputCheck(BaseModel):
    """A fixed batch: the step engine against one pipeline call (medians)."""

    batch: int
    steps: int
    pipeline_s: float
    engine_s: float
    engine_vs_pipeline: float  # the engine's images/s over the pipeline call's
    max_distance: float  # the largest mean absolute pixel difference (0..255) between the two


class StepBench(BaseModel):
    """One run of this bench."""

    model: str
    device: str
    dtype: str
    width: int
    height: int
    torch_threads: int
    curve: list[RowPoint]
    check: ThroughputCheck | None


def _jobs(rows: int, steps: int, width: int, height: int) -> list[StepJob]:
    """Guided jobs of two rows each, and one unguided job for an odd count."""
    guided = [(f"g{i}", 7.5) for i in range(rows // 2)] + [("u", 1.0)] * (rows % 2)
    return [
        StepJob(name, PROMPT, width=width, height=height, steps=steps, guidance_scale=g, seed=i)
        for i, (name, g) in enumerate(guided)
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def curve_point(pipe: Any, rows: int, width: int, height: int, repeats: int = 5) -> RowPoint:
    """Time `repeats` loop steps of `rows` rows (after two warm-up steps)."""
    warmup = 2
    jobs = _jobs(rows, warmup + repeats, width, height)
    loop = Loop(pipe.unet, stopwatch=stopwatch_for(pipe.unet.device))
    for track in Intake(family_of(pipe), "bench").start(jobs).values():
        assert not isinstance(track, Exception), track
        loop.join(track)
    device = pipe.unet.device
    walls = []
    for i in range(warmup + repeats):
        _sync(device)
        began = time.perf_counter()
        loop.step()
        _sync(device)
        if i >= warmup:
            walls.append(time.perf_counter() - began)
    laps = [s for _, _, s in loop.stopwatch.laps()][warmup:]
    step, denoise = statistics.median(walls), statistics.median(laps)
    return RowPoint(
        rows=rows,
        jobs=len(jobs),
        step_ms=round(step * 1000, 3),
        denoise_ms=round(denoise * 1000, 3),
        ms_per_row=round(step * 1000 / rows, 3),
        outside_share=round(max(0.0, 1 - denoise / step), 4),
    )


def denoiser_curve(
    pipe: Any, rows: Sequence[int], width: int, height: int, repeats: int = 5
) -> list[RowPoint]:
    """The loop step's time at each row count."""
    return [curve_point(pipe, n, width, height, repeats) for n in rows]


class _Collector:
    """A listener that waits for a number of jobs to finish."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.images: dict[str, list[Image]] = {}
        self.done = threading.Event()

    def on_progress(self, reports: Sequence[StepReport]) -> None:
        """Ignored."""

    def on_done(self, job_id: str, images: list[Image]) -> None:
        """Keep the images; set `done` at the last job."""
        self.images[job_id] = images
        if len(self.images) == self.count:
            self.done.set()

    def on_failed(self, job_id: str, error: Exception) -> None:
        """A benchmark job must not fail."""
        log.error("job %s failed: %s", job_id, error)
        self.done.set()

    def on_canceled(self, job_id: str) -> None:
        """Nothing is canceled here."""


def _pipeline_once(pipe: Any, jobs: list[StepJob]) -> tuple[float, list[Image]]:
    """The batch engine's one pipeline call for `jobs`."""
    first = jobs[0]
    bucket = Bucket(first.width, first.height, first.steps, first.guidance_scale)
    rows = [Row(j.job_id, 0, j.prompt, j.negative_prompt, j.seed) for j in jobs]
    began = time.perf_counter()
    images = Engine(pipe).generate(rows, bucket, lambda _: True)
    return time.perf_counter() - began, images


def _engine_once(pipe: Any, jobs: list[StepJob]) -> tuple[float, list[Image]]:
    """The step engine, every job submitted at once, until the last one's images are made."""
    collector = _Collector(len(jobs))
    settings = LoopSettings(max_rows=2 * len(jobs), adaptive=False)
    engine = StepEngine(pipe, collector, model="bench", settings=settings).start()
    try:
        began = time.perf_counter()
        for job in jobs:
            engine.submit(job)
        collector.done.wait(3600)
        elapsed = time.perf_counter() - began
    finally:
        engine.close()
    return elapsed, [collector.images[j.job_id][0] for j in jobs]


def engine_vs_pipeline(
    pipe: Any, batch: int, steps: int, width: int, height: int, repeats: int = 3
) -> ThroughputCheck:
    """Interleaved runs of both; medians, and how far apart their images are."""
    jobs = [StepJob(f"b{i}", PROMPT, width=width, height=height, steps=steps, seed=i)
            for i in range(batch)]  # fmt: skip
    _pipeline_once(pipe, jobs[:1])  # warm-up
    pipeline, engine, distance = [], [], 0.0
    for _ in range(repeats):
        seconds, wanted = _pipeline_once(pipe, jobs)
        pipeline.append(seconds)
        seconds, made = _engine_once(pipe, jobs)
        engine.append(seconds)
        distance = max(distance, *(_distance(a, b) for a, b in zip(made, wanted, strict=True)))
    p, e = statistics.median(pipeline), statistics.median(engine)
    return ThroughputCheck(
        batch=batch,
        steps=steps,
        pipeline_s=round(p, 4),
        engine_s=round(e, 4),
        engine_vs_pipeline=round(p / e, 3),
        max_distance=round(distance, 4),
    )


def _distance(a: Image, b: Image) -> float:
    """Mean absolute difference between two images, on the 0..255 scale."""
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean())


def run_step_bench(
    model: str = "tiny",
    cache_dir: Path = Path(".models"),
    *,
    device: str | None = None,
    dtype: str | None = None,
    width: int = 64,
    height: int = 64,
    rows: Sequence[int] = tuple(range(1, 17)),
    repeats: int = 5,
    batch: int | None = 4,
    steps: int = 10,
    threads: int | None = None,
) -> StepBench:
    """Load `model` as a worker does and measure both figures (`batch=None`: the curve only)."""
    set_cpu_threads(threads)
    pipe = load_pipeline(model, cache_dir, device=device, dtype=dtype)
    with torch.inference_mode():
        curve = denoiser_curve(pipe, rows, width, height, repeats)
    check = None if batch is None else engine_vs_pipeline(pipe, batch, steps, width, height)
    return StepBench(
        model=model,
        device=str(pipe.unet.device),
        dtype=str(pipe.unet.dtype).removeprefix("torch."),
        width=width,
        height=height,
        torch_threads=torch.get_num_threads(),
        curve=curve,
        check=check,
    )


def table(result: StepBench) -> str:
    """The figures as text."""
    lines = [
        f"{result.model} on {result.device} ({result.dtype}, {result.torch_threads} threads), "
        f"{result.width}x{result.height}",
        "rows  jobs  step ms  denoise ms  ms/row  outside",
    ]
    lines += [
        f"{p.rows:4d}  {p.jobs:4d}  {p.step_ms:7.2f}  {p.denoise_ms:10.2f}  {p.ms_per_row:6.2f}"
        f"  {p.outside_share:7.1%}"
        for p in result.curve
    ]
    c = result.check
    if c is not None:
        lines.append(
            f"batch of {c.batch}, {c.steps} steps: pipeline {c.pipeline_s:.3f} s, step engine "
            f"{c.engine_s:.3f} s (x{c.engine_vs_pipeline:.2f} throughput), "
            f"largest pixel difference {c.max_distance:.3f}"
        )
    return "\n".join(lines)


def _rows(raw: str) -> tuple[int, ...]:
    """`1-16` or `1,2,4,8`."""
    if "-" in raw:
        low, high = raw.split("-")
        return tuple(range(int(low), int(high) + 1))
    return tuple(int(v) for v in raw.split(","))


def main(argv: Sequence[str] | None = None) -> int:
    """Measure and print; `--json FILE` also writes the figures."""
    p = argparse.ArgumentParser(prog="python -m bench.steps", description=__doc__)
    p.add_argument("--model", default="tiny")
    p.add_argument("--model-cache", type=Path, default=Path(".models"))
    p.add_argument("--device")
    p.add_argument("--dtype")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--rows", type=_rows, default=tuple(range(1, 17)), help="1-16 or 1,2,4,8")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=4, help="throughput check batch (0: skip)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    result = run_step_bench(
        args.model, args.model_cache, device=args.device, dtype=args.dtype, width=args.size,
        height=args.size, rows=args.rows, repeats=args.repeats, batch=args.batch or None,
        steps=args.steps, threads=args.threads,
    )  # fmt: skip
    sys.stdout.write(table(result) + "\n")
    if args.json:
        args.json.write_text(result.model_dump_json(indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
