"""The direct baseline: the worker's own pipeline call, in a tight loop, in a process of its own.

The child loads the model exactly as a worker does (`load_pipeline`, `set_cpu_threads`) and calls
`Engine.generate`, so the only difference from the system is everything around that call. It loads
while the rest of the bench starts, then waits to be told to measure, so that its timings are taken
on a quiet machine. Batch sizes are interleaved call by call, so that a burst of noise from other
processes lands on all of them alike.
"""

from __future__ import annotations

import multiprocessing
import statistics
import time
import traceback
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from bench import BenchError, stop_child
from bench.stages import Spread, spread


class DirectSpec(BaseModel):
    """What to load and how to call it."""

    model_config = ConfigDict(frozen=True)

    model: str = "tiny"
    cache_dir: Path
    device: str | None = None
    dtype: str | None = None
    threads: int | None = 1
    width: int = 64
    height: int = 64
    steps: int = 4
    guidance_scale: float = 7.5
    prompt: str = "a red fox in the snow"
    batch_sizes: tuple[int, ...] = (1, 4)
    repeats: int = 5
    compile: bool = False


class DirectPoint(BaseModel):
    """Timings of one batch size."""

    batch_size: int
    seconds: Spread
    images_per_s: float  # batch size over the median call time
    images_per_core_s: float  # images over the CPU time the calls took (contention divided out)
    samples_s: list[float]  # every timed call, in order
    cpu_samples_s: list[float]  # the CPU time of each


class DirectResult(BaseModel):
    """The direct baseline's figures."""

    spec: DirectSpec
    load_s: float
    warmup_s: dict[int, float]  # first call per batch size (compilation when compiled)
    points: list[DirectPoint]
    device: str
    dtype: str
    device_name: str
    torch_threads: int
    cpu_s: float

    def point(self, batch_size: int) -> DirectPoint | None:
        """The figures of one batch size, if measured."""
        return next((p for p in self.points if p.batch_size == batch_size), None)

    def merged(self, later: DirectResult) -> DirectResult:
        """These figures and a later measurement's, as one (the machine's load drifts)."""
        calls: dict[int, list[tuple[float, float]]] = {}
        for p in [*self.points, *later.points]:
            calls.setdefault(p.batch_size, []).extend(
                zip(p.samples_s, p.cpu_samples_s, strict=True)
            )
        return self.model_copy(
            update={"points": direct_points(calls), "cpu_s": self.cpu_s + later.cpu_s}
        )


def direct_points(calls: dict[int, list[tuple[float, float]]]) -> list[DirectPoint]:
    """Figures per batch size from the timed calls' (wall, CPU) seconds."""
    return [
        DirectPoint(
            batch_size=bs,
            seconds=spread(w for w, _ in timed),
            images_per_s=bs / statistics.median(w for w, _ in timed),
            images_per_core_s=bs * len(timed) / max(1e-9, sum(c for _, c in timed)),
            samples_s=[w for w, _ in timed],
            cpu_samples_s=[c for _, c in timed],
        )
        for bs, timed in sorted(calls.items())
    ]


class Loaded:
    """The loaded engine and the call the worker makes, for one spec."""

    def __init__(self, spec: DirectSpec) -> None:
        import torch
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        # Load-time progress bars and notices would interleave with the bench's own output.
        for library in (diffusers_logging, transformers_logging):
            library.set_verbosity_error()
            library.disable_progress_bar()

        from worker.inference import Engine
        from worker.models import load_pipeline, set_cpu_threads

        set_cpu_threads(spec.threads)
        start = time.perf_counter()
        pipe = load_pipeline(spec.model, spec.cache_dir, device=spec.device, dtype=spec.dtype)
        if spec.compile:
            pipe.unet = torch.compile(pipe.unet)
        self.spec, self.engine, self.pipe = spec, Engine(pipe), pipe
        self.load_s = time.perf_counter() - start
        self.threads = torch.get_num_threads()

    def device_name(self) -> str:
        """The card's name, or the CPU's."""
        import torch

        if str(self.pipe.device).startswith("cuda"):
            return str(torch.cuda.get_device_name(self.pipe.device))
        return "cpu"

    def call(self, batch_size: int) -> tuple[float, float]:
        """One pipeline call of `batch_size` rows: its wall and CPU seconds."""
        from core.jobs import Bucket
        from worker.inference import Row

        s = self.spec
        rows = [Row("job_direct", i, s.prompt, None, i) for i in range(batch_size)]
        bucket = Bucket(s.width, s.height, s.steps, s.guidance_scale)
        start, cpu = time.perf_counter(), time.process_time()
        self.engine.generate(rows, bucket, lambda _step: True)
        return time.perf_counter() - start, time.process_time() - cpu


def measure(loaded: Loaded) -> DirectResult:
    """Warm each batch size up, then time them interleaved."""
    spec = loaded.spec
    cpu = time.process_time()
    warmup = {bs: loaded.call(bs)[0] for bs in spec.batch_sizes}
    calls: dict[int, list[tuple[float, float]]] = {bs: [] for bs in spec.batch_sizes}
    for _ in range(spec.repeats):
        for bs in spec.batch_sizes:
            calls[bs].append(loaded.call(bs))
    return DirectResult(
        spec=spec,
        load_s=loaded.load_s,
        warmup_s=warmup,
        points=direct_points(calls),
        device=str(loaded.pipe.device),
        dtype=str(loaded.pipe.dtype).removeprefix("torch."),
        device_name=loaded.device_name(),
        torch_threads=loaded.threads,
        cpu_s=time.process_time() - cpu,
    )


def serve(conn: Pipe, raw_spec: str) -> None:
    """The child: load, say so, then measure each time asked (None ends it)."""
    try:
        loaded = Loaded(DirectSpec.model_validate_json(raw_spec))
        conn.send(("ready", ""))
        while conn.recv() is not None:
            conn.send(("ok", measure(loaded).model_dump_json()))
    except Exception:
        conn.send(("error", traceback.format_exc()))


class Direct:
    """The direct baseline's process, seen from the bench."""

    def __init__(self, spec: DirectSpec) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=serve, args=(child, spec.model_dump_json()), name="dq-bench-direct", daemon=True
        )
        self.ready = False

    def start(self) -> Direct:
        """Start loading the model."""
        self.process.start()
        return self

    def _recv(self, timeout: float) -> Any:
        if not self.conn.poll(timeout):
            raise BenchError(f"the direct baseline did not answer within {timeout:.0f} s")
        status, raw = self.conn.recv()
        if status == "error":
            raise BenchError(f"the direct baseline failed:\n{raw}")
        return raw

    def wait_ready(self, timeout: float = 300) -> None:
        """Block until the model is loaded (at once when it already is)."""
        if not self.ready:
            self._recv(timeout)
            self.ready = True

    def measure(self, timeout: float = 1800) -> DirectResult:
        """Warm up and time every batch size."""
        self.conn.send("go")
        return DirectResult.model_validate_json(self._recv(timeout))

    def stop(self) -> None:
        """End the process."""
        stop_child(self.process, self.conn)
