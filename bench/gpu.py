"""GPU mode: the SD 1.5-shaped random-weight model on one CUDA card, direct and through the system.

Direct: batch 1/4/8, eager and with the UNet under `torch.compile` (each batch size's first call,
the compilation, is reported apart). System: one worker per max batch size, closed loop with a lone
user and with two batches' worth of users, and at the largest batch the 40 users the target names.
The worker has no compile switch, so the system is compared with the eager direct figures. On a
machine without CUDA it says so and writes nothing, unless told `--device cpu`: then it runs the
same steps on the CPU (with `--model tiny` and small settings, in under a minute), which checks
the mode itself, not any card.
"""

from __future__ import annotations

import logging
import sys
import time
from contextlib import ExitStack
from datetime import datetime

from pydantic import BaseModel

from bench import BenchError
from bench.cpu import Meter
from bench.direct import Direct, DirectResult
from bench.generator import LoadGenerator
from bench.load import LoadSpec
from bench.machine import Machine, Versions, cpu_name, machine, versions
from bench.plan import Plan
from bench.points import Point, point_of
from bench.report import Target, created_now
from bench.system import API_KEY, Stack
from bench.variants import base_env, direct_spec, job_body
from core.embedded import EmbeddedRedis

log = logging.getLogger(__name__)

# Targets on one H100 (shared/BENCHMARKS.md).
SYSTEM_VS_DIRECT = 0.95
BATCH_GAIN = 1.5
EAGER_IMAGES_PER_S = 4.0
COMPILED_IMAGES_PER_S = 8.0
TARGET_USERS = 40
TARGET_P99_MS = 10_000.0


class GpuSystemPoint(BaseModel):
    """The system at one max batch size."""

    max_batch_size: int
    points: list[Point]  # by users: 1, 2 x batch, and the target's users at the largest batch
    vs_direct_eager: float | None  # best images/s over direct eager at this batch size


class GpuReport(BaseModel):
    """One GPU run."""

    created_at: datetime
    command: list[str]
    plan: Plan
    card: str
    machine: Machine
    versions: Versions
    direct_eager: DirectResult
    direct_compiled: DirectResult | None
    compile_error: str | None
    system: list[GpuSystemPoint]
    targets: list[Target]
    wall_s: float


def cuda_card() -> str | None:
    """The first CUDA card's name, or None when torch sees none."""
    import torch

    return str(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else None


def measure_direct(plan: Plan, compiled: bool) -> DirectResult:
    """Direct figures at every GPU batch size."""
    spec = direct_spec(plan).model_copy(
        update={"batch_sizes": plan.gpu_batches, "compile": compiled}
    )
    direct = Direct(spec).start()
    try:
        direct.wait_ready(timeout=1800)
        return direct.measure(timeout=3600)
    finally:
        direct.stop()


def measure_system(
    plan: Plan, batch: int, direct: DirectResult, load: LoadGenerator
) -> GpuSystemPoint:
    """One stack with max batch `batch`, under each load in turn."""
    users = [1, 2 * batch]
    if batch == max(plan.gpu_batches) and TARGET_USERS not in users:
        users.append(TARGET_USERS)
    with ExitStack() as cleanup:
        redis = EmbeddedRedis(plan.out / "work" / f"redis-{batch}").start()
        cleanup.callback(redis.stop)
        env = base_env(plan, plan.out / "work") | {
            "DQ_MAX_BATCH_SIZE": str(batch),
            "DQ_STORAGE_URL": (plan.out / "work" / "images").resolve().as_uri(),
        }
        stack = Stack("system", redis, 1, env).start(1, plan.out / "logs")
        cleanup.callback(stack.stop)
        stack.wait_ready(timeout=1800)
        points = [_point(plan, stack, load, n, batch) for n in users]
    best = max((p.images_per_s or 0.0 for p in points), default=0.0)
    at = direct.point(batch)
    ratio = best / at.images_per_s if at and best else None
    return GpuSystemPoint(max_batch_size=batch, points=points, vs_direct_eager=ratio)


def _point(plan: Plan, stack: Stack, load: LoadGenerator, users: int, batch: int) -> Point:
    spec = LoadSpec(
        url=stack.url,
        api_key=API_KEY,
        users=users,
        duration_s=plan.duration_s,
        poll_s=plan.poll_s,
        wait=plan.wait,
        body=job_body(plan),
    )
    meter = Meter(stack.roles() | {"loadgen": [load.pid or 0]}).start()
    result = load.run(spec)
    point = point_of("system", result, max_batch=batch, warmup_s=plan.warmup_s, cpu=meter.read())
    log.info("system batch %d, users %d: %s images/s", batch, users, point.images_per_s)
    return point


def _rate(result: DirectResult | None, batch: int) -> float | None:
    point = result.point(batch) if result else None
    return point.images_per_s if point else None


def gpu_targets(
    plan: Plan, eager: DirectResult, compiled: DirectResult | None, system: list[GpuSystemPoint]
) -> list[Target]:
    """The H100 targets, each met or missed (a bigger or smaller card changes what is fair)."""
    top = max(plan.gpu_batches)
    gain = _ratio(_rate(eager, top), _rate(eager, 1))
    found = [
        Target(
            name=f"system_vs_direct_batch{s.max_batch_size}",
            value=s.vs_direct_eager,
            target=f">= {SYSTEM_VS_DIRECT}",
            met=None if s.vs_direct_eager is None else s.vs_direct_eager >= SYSTEM_VS_DIRECT,
        )
        for s in system
        if s.max_batch_size > 1
    ]
    found += [
        _floor(f"batch{top}_vs_batch1_eager", gain, BATCH_GAIN),
        _floor(f"eager_images_per_s_batch{top}", _rate(eager, top), EAGER_IMAGES_PER_S),
        _floor(f"compiled_images_per_s_batch{top}", _rate(compiled, top), COMPILED_IMAGES_PER_S),
    ]
    crowd = next((p for s in system for p in s.points if p.users == TARGET_USERS), None)
    p99 = crowd.stages_ms["e2e"].p99 if crowd and "e2e" in crowd.stages_ms else None
    found.append(
        Target(
            name=f"e2e_p99_ms_at_{TARGET_USERS}_users",
            value=p99,
            target=f"<= {TARGET_P99_MS:.0f}",
            met=None if p99 is None else p99 <= TARGET_P99_MS,
        )
    )
    return found


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _floor(name: str, value: float | None, floor: float) -> Target:
    met = None if value is None else value >= floor
    return Target(name=name, value=value, target=f">= {floor}", met=met)


def run_gpu(plan: Plan) -> int:
    """Measure on the CUDA card, or explain why not; the process exit code."""
    began = time.monotonic()
    on_cpu = plan.device == "cpu"
    gpu = None if on_cpu else cuda_card()
    if gpu is None and not on_cpu:
        log.warning(
            "GPU mode skipped: torch sees no CUDA device here; run it on a CUDA machine "
            "(or with --device cpu to check the mode on this one)"
        )
        return 0
    card = gpu or f"cpu: {cpu_name()}"
    eager = measure_direct(plan, compiled=False)
    compiled, error = None, None
    if plan.gpu_compile:
        try:
            compiled = measure_direct(plan, compiled=True)
        except BenchError as e:  # a compile failure must not lose the eager and system figures
            error = e.message
            log.warning("torch.compile run failed: %s", error)
    load = LoadGenerator().start()
    try:
        system = [measure_system(plan, b, eager, load) for b in plan.gpu_batches]
    finally:
        load.stop()
    report = GpuReport(
        created_at=created_now(),
        command=sys.argv,
        plan=plan,
        card=card,
        machine=machine(gpu=gpu),
        versions=versions(),
        direct_eager=eager,
        direct_compiled=compiled,
        compile_error=error,
        system=system,
        targets=gpu_targets(plan, eager, compiled, system),
        wall_s=round(time.monotonic() - began, 1),
    )
    plan.out.mkdir(parents=True, exist_ok=True)
    (plan.out / "report.json").write_text(report.model_dump_json(indent=2) + "\n")
    for t in report.targets:
        log.info("%s: %s (target %s) %s", t.name, t.value, t.target, t.met)
    log.info("GPU report: %s", plan.out / "report.json")
    return 0
