"""`dq bench --adapters`: what LoRA switches and image inputs cost in the engine (no queue).

One process loads a model the way a worker does (`load_engine` from its catalog entry, with a LoRA
folder of two tiny random LoRAs built on the spot) and times `Engine.generate` batches:

- LoRA: a batch with no LoRA; a batch whose LoRA set is the one already active; a batch that
  switches to another set already loaded (the cache's case); and one that must read the LoRA from
  its file first (a cache too small to keep it). The switch itself (`Adapters.use`) is timed too.
- Tasks: images/s of txt2img, img2img and inpaint at the same size, steps and batch sizes.

Figures are medians of `--repeats` batches, taken in rounds so that drift hits every kind alike.
Printed, and written to DIR/adapters.json; nothing here is a pass/fail target.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bench import BenchError
from bench.machine import machine, versions
from core.catalog import Catalog
from core.jobs import Bucket
from core.settings import load_settings
from worker.inference import Engine, Row, load_engine
from worker.loras import Adapters
from worker.models import build_tiny_lora, set_cpu_threads

log = logging.getLogger(__name__)

LORA_SETS = {"a": (("ink", 1.0),), "b": (("neon", 1.0),)}
EDIT_STRENGTH = 0.8


@dataclass(frozen=True)
class AdapterBench:
    """What to measure with."""

    out: Path
    cache_dir: Path
    model: str = "tiny"
    device: str | None = "cpu"
    threads: int | None = 1
    size: int = 64
    steps: int = 10
    batches: tuple[int, ...] = (1, 4)
    repeats: int = 7

    @classmethod
    def of(cls, args: argparse.Namespace) -> AdapterBench:
        """The settings `dq bench --adapters` was given, and these defaults for the rest."""
        given = {
            "model": args.model,
            "device": args.device,
            "threads": args.threads,
            "size": args.size,
            "steps": args.steps,
            "batches": args.gpu_batches,
            "repeats": args.direct_repeats,
        }
        cache = args.model_cache or load_settings().model_cache
        return cls(args.out, cache, **{k: v for k, v in given.items() if v is not None})


def run_adapters(bench: AdapterBench) -> int:
    """Measure, print and write the figures; 0 when done."""
    set_cpu_threads(bench.threads)
    with tempfile.TemporaryDirectory() as folder:
        loras = Path(folder)
        for seed, name in enumerate(("ink", "neon"), start=1):
            build_tiny_lora(loras / f"{name}.safetensors", bench.model, seed=seed)
        figures = {
            "bench": {**asdict(bench), "out": str(bench.out), "cache_dir": str(bench.cache_dir)},
            "machine": machine().model_dump(),
            "versions": versions().model_dump(),
            "lora": lora_figures(bench, loras),
            "tasks": task_figures(bench, loras),
        }
    bench.out.mkdir(parents=True, exist_ok=True)
    (bench.out / "adapters.json").write_text(json.dumps(figures, indent=2))
    show(figures)
    return 0


def engine_for(bench: AdapterBench, loras: Path, cache_bytes: int) -> Engine:
    """An engine loaded as a worker loads it, with a LoRA cache of `cache_bytes`."""
    settings = load_settings(
        model=bench.model, device=bench.device, loras=loras, model_cache=bench.cache_dir
    )
    catalog = Catalog.from_settings(settings)
    return load_engine(catalog.get(None), bench.cache_dir, catalog.loras, cache_bytes)


def rows(n: int, with_inputs: bool, size: int) -> list[Row]:
    """n rows of distinct prompts and seeds, with an input picture and mask when asked."""
    rng = np.random.default_rng(0)
    picture = Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8))
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 2, 0, size, size))
    return [
        Row(f"job_{i}", 0, f"a lighthouse, number {i}", None, 1000 + i)
        if not with_inputs
        else Row(f"job_{i}", 0, f"a lighthouse, number {i}", None, 1000 + i, picture, mask)
        for i in range(n)
    ]


def timed(call: Callable[[], object]) -> float:
    """Seconds one call takes."""
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def lora_figures(bench: AdapterBench, loras: Path) -> dict[str, float]:
    """Median ms of a batch by what its LoRA set asks of the cache, and of the switch alone."""
    cached = engine_for(bench, loras, 1 << 30)
    cold = engine_for(bench, loras, 0)  # keeps nothing it need not: every switch reads a file
    batch = rows(bench.batches[-1], False, bench.size)

    def bucket(name: str | None) -> Bucket:
        sets = LORA_SETS.get(name or "", ())
        return Bucket(bench.size, bench.size, bench.steps, 7.5, bench.model, loras=sets)

    def run(engine: Engine, name: str | None) -> float:
        return timed(lambda: engine.generate(batch, bucket(name), lambda _: True))

    for name in ("a", "b", None):  # warm up: both LoRAs loaded, first calls paid
        run(cached, name)
        run(cold, name)
    samples: dict[str, list[float]] = {}
    for _ in range(bench.repeats):
        for kind, seconds in lora_round(cached, cold, run).items():
            samples.setdefault(kind, []).append(seconds)
    return {f"{kind}_ms": round(statistics.median(s) * 1000, 2) for kind, s in samples.items()}


def lora_round(
    cached: Engine, cold: Engine, run: Callable[[Engine, str | None], float]
) -> dict[str, float]:
    """One batch of each kind; the order sets up what each kind needs."""
    hot, disk = adapters_of(cached), adapters_of(cold)
    # The previous round (or the warm-up) left `cached` with no LoRA on.
    figures = {"base_batch": run(cached, None)}
    figures["switch_cached_batch"] = run(cached, "a")
    figures["same_set_batch"] = run(cached, "a")
    figures["switch_cached_alone"] = timed(lambda: hot.use(LORA_SETS["b"]))
    figures["switch_off_alone"] = timed(lambda: hot.use(()))
    # `cold` keeps only the active set: set a, then b must be read from its file.
    run(cold, "a")
    figures["switch_from_file_batch"] = run(cold, "b")
    figures["switch_from_file_alone"] = timed(lambda: disk.use(LORA_SETS["a"]))
    return figures


def adapters_of(engine: Engine) -> Adapters:
    """The engine's LoRA cache (a bench engine always has one)."""
    if engine.adapters is None:
        raise BenchError(f"{engine.spec.name if engine.spec else 'the model'} takes no LoRAs")
    return engine.adapters


def task_figures(bench: AdapterBench, loras: Path) -> dict[str, dict[str, float]]:
    """Images/s of each task by batch size, and each one's ratio to txt2img."""
    engine = engine_for(bench, loras, 0)
    figures: dict[str, dict[str, float]] = {}
    for n in bench.batches:
        text, edits = rows(n, False, bench.size), rows(n, True, bench.size)
        calls = {
            "txt2img": (text, Bucket(bench.size, bench.size, bench.steps, 7.5, bench.model)),
            "img2img": (edits, _edit_bucket(bench, "img2img")),
            "inpaint": (edits, _edit_bucket(bench, "inpaint")),
        }
        samples: dict[str, list[float]] = {task: [] for task in calls}
        for batch, b in calls.values():  # warm up: each pipeline's first call
            call(engine, batch, b)
        for _ in range(bench.repeats):
            for task, (batch, b) in calls.items():
                samples[task].append(call(engine, batch, b))
        rates = {task: n / statistics.median(s) for task, s in samples.items()}
        figures[f"batch_{n}"] = {
            **{f"{task}_images_per_s": round(rate, 2) for task, rate in rates.items()},
            **{f"{task}_vs_txt2img": round(rates[task] / rates["txt2img"], 2) for task in rates},
        }
    return figures


def call(engine: Engine, batch: list[Row], b: Bucket) -> float:
    """Seconds one batch takes."""
    return timed(lambda: engine.generate(batch, b, lambda _: True))


def _edit_bucket(bench: AdapterBench, task: str) -> Bucket:
    return Bucket(bench.size, bench.size, bench.steps, 7.5, bench.model, task, (), EDIT_STRENGTH)


def show(figures: Mapping[str, object]) -> None:
    """The figures, on stdout."""
    print(json.dumps({k: figures[k] for k in ("bench", "lora", "tasks")}, indent=2))
