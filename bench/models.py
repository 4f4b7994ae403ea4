"""`dq bench --models`: mixed traffic over two models, served by one deployment or by two.

- shared: one gateway and one Redis database over a catalog of `tiny` and `tiny-sd2`, a worker
  per model (`DQ_WORKER_MODEL`); the ledger routes each job to its model's queue.
- separate: two deployments, each a gateway, a Redis database and a worker, over a catalog of
  its one model.

Both get the same traffic at once: closed-loop users, as many for each model, each user asking
for its model (at the shared gateway, or at its model's own). Each shape runs as many processes
of the model (one per model, each on `--threads` threads), so the question is what routing and
sharing one gateway and one ledger cost. Measured in rounds taken in turn (ABBA, so that drift
hits both alike): images/s, each model's images/s and median end-to-end latency, and whether
every job ran on a worker of its own model. Written to DIR/models.json; no pass/fail target.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from bench import stages
from bench.cpu import Meter
from bench.generator import LoadGenerator
from bench.load import LoadSpec, Sample
from bench.machine import machine, versions
from bench.plan import Plan, make_plan
from bench.system import API_KEY, Child, Stack
from bench.variants import base_env, job_body
from core.embedded import EmbeddedRedis
from core.settings import load_settings

log = logging.getLogger(__name__)

MODELS = ("tiny", "tiny-sd2")
SHORT = {"duration_s": 12.0, "warmup_s": 3.0, "rounds": 2}  # about two minutes in all


@dataclass(frozen=True)
class ModelsBench:
    """What to measure with: the quick plan's model knobs, these users, durations and rounds."""

    plan: Plan
    users: int = 4  # closed-loop users per model: two batches of 4 waiting at each worker

    @classmethod
    def of(cls, args: argparse.Namespace) -> ModelsBench:
        """The settings `dq bench --models` was given, and the short defaults for the rest."""
        given = {
            "width": args.size,
            "height": args.size,
            "steps": args.steps,
            "batch": args.batch,
            "threads": args.threads,
            "duration_s": args.duration_s,
            "warmup_s": args.warmup_s,
            "rounds": args.rounds,
        }
        cache = args.model_cache or load_settings().model_cache
        chosen = {**SHORT, **{k: v for k, v in given.items() if v is not None}}
        plan = make_plan("quick", args.out, cache, **chosen)
        users = args.users[0] if args.users else cls.users
        return cls(plan, users)


@dataclass
class Shape:
    """One way of serving the two models: its stacks, and where each model's traffic goes."""

    name: str
    stacks: dict[str, Stack]  # model -> the stack serving it
    models_of: dict[str, str] = field(default_factory=dict)  # worker name -> its model

    def urls(self) -> dict[str, str]:
        """Each model's gateway."""
        return {model: stack.url for model, stack in self.stacks.items()}

    def unique(self) -> list[Stack]:
        """Each stack once."""
        return list({id(s): s for s in self.stacks.values()}.values())


class ModelShare(BaseModel):
    """One model's share of a point."""

    jobs: int
    succeeded: int
    misrouted: int  # jobs run by a worker of another model (must be 0)
    images_per_s: float | None
    p50_ms: float | None  # end to end, jobs submitted inside the measured window


class ShapePoint(BaseModel):
    """One shape under the mixed traffic, in one round."""

    shape: str
    round: int
    window_s: float
    images_per_s: float | None
    models: dict[str, ModelShare]
    # Images per CPU-second the serving processes (gateways, workers, Redis) got: what outside
    # load moves least, since it divides out the cores the machine's other users left.
    images_per_core_s: float | None
    cpu_cores: dict[str, float]  # cores used per role; `others`: load from outside the bench
    load_avg: float | None  # the machine's 1-minute load average at the end (2 cores: 2 is full)


def catalog(models: tuple[str, ...], plan: Plan) -> str:
    """A catalog of `models`, each the built-in model of that name, at the plan's size."""
    side = max(plan.width, plan.height, 256)
    return "".join(
        f'[models.{m}]\nsource = "{m}"\nmax_side = {side}\n\n'
        f"[models.{m}.defaults]\nwidth = {plan.width}\nheight = {plan.height}\n"
        f"steps = {plan.steps}\n\n"
        for m in models
    )


def start_shapes(bench: ModelsBench, redis: EmbeddedRedis, work: Path) -> list[Shape]:
    """Both shapes, started side by side (the models load at once), not yet ready."""
    plan, logs = bench.plan, bench.plan.out / "logs"

    def env_for(name: str, models: tuple[str, ...]) -> dict[str, str]:
        path = work / f"{name}.toml"
        path.write_text(catalog(models, plan))
        return base_env(plan, work / name) | {"DQ_MODELS": str(path)}

    shared = Stack("shared", redis, 1, env_for("shared", MODELS)).start(0, logs)
    host = socket.gethostname()
    models_of = {}
    for model in MODELS:
        name = f"bench-shared-{model}@{host}"
        argv = [sys.executable, "-m", "worker", "--name", name]
        env = {**shared.env, "DQ_WORKER_MODEL": model}
        shared.workers[name] = Child(argv, env, logs / f"shared-worker-{model}.log")
        models_of[name] = model
    separate: dict[str, Stack] = {}
    for db, model in enumerate(MODELS, start=2):
        stack = Stack(f"only-{model}", redis, db, env_for(f"only-{model}", (model,)))
        separate[model] = stack.start(1, logs)
        models_of |= dict.fromkeys(stack.workers, model)
    return [
        Shape("shared", dict.fromkeys(MODELS, shared), models_of),
        Shape("separate", separate, models_of),
    ]


def run_models(bench: ModelsBench) -> int:
    """Start both shapes, measure them in turn, write and print the figures; 0 when done."""
    plan = bench.plan
    work = plan.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    redis = EmbeddedRedis(work / "redis").start()
    generators = {m: LoadGenerator().start() for m in MODELS}
    shapes: list[Shape] = []
    try:
        shapes = start_shapes(bench, redis, work)
        for shape in shapes:
            for stack in shape.unique():
                stack.wait_ready()
        log.info("both shapes ready; %d rounds of %.0f s each", plan.rounds, plan.duration_s)
        points = []
        for round_ in range(plan.rounds):
            order = shapes if round_ % 2 == 0 else shapes[::-1]
            for shape in order:
                points.append(measure(bench, shape, generators, redis, round_))
                log.info("%s, round %d: %s img/s", shape.name, round_, points[-1].images_per_s)
    finally:
        for shape in shapes:
            for stack in shape.unique():
                stack.stop()
        for generator in generators.values():
            generator.stop()
        redis.stop()
    figures = report(bench, points)
    (plan.out / "models.json").write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures["summary"], indent=2))
    return 0


def measure(
    bench: ModelsBench,
    shape: Shape,
    generators: dict[str, LoadGenerator],
    redis: EmbeddedRedis,
    round_: int,
) -> ShapePoint:
    """Drive both models' users at once against `shape`; its figures."""
    plan, urls = bench.plan, shape.urls()
    specs = {
        model: LoadSpec(
            url=urls[model],
            api_key=API_KEY,
            users=bench.users,
            duration_s=plan.duration_s,
            body={**job_body(plan), "model": model},
            seed=1000 * round_ + 100 * i,
        )
        for i, model in enumerate(MODELS)
    }
    meter = Meter(roles(shape, generators, redis)).start()
    with ThreadPoolExecutor(len(MODELS)) as pool:
        runs = pool.map(lambda m: (m, generators[m].run(specs[m])), MODELS)
        results = dict(runs)
    cpu = meter.read()
    samples = {m: with_workers(shape.stacks[m], r.samples) for m, r in results.items()}
    start = max(r.started for r in results.values()) + plan.warmup_s
    window = (start, min(r.ended for r in results.values()))
    every = [s for ss in samples.values() for s in ss]
    rate = stages.images_per_s(stages.calls_of(every), window)
    serving = sum(cpu.get(role, 0.0) for role in ("gateway", "worker", "redis"))
    return ShapePoint(
        shape=shape.name,
        round=round_,
        window_s=round(window[1] - window[0], 2),
        images_per_s=_rounded(rate),
        images_per_core_s=_rounded(rate / serving) if rate and serving > 0 else None,
        cpu_cores=cpu,
        models={m: share(m, samples[m], shape, window) for m in MODELS},
        load_avg=round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    )


def roles(
    shape: Shape, generators: dict[str, LoadGenerator], redis: EmbeddedRedis
) -> dict[str, list[int]]:
    """Process ids by role, for CPU accounting: this shape's serving processes, the generators."""
    found: dict[str, list[int]] = {"loadgen": [g.pid for g in generators.values() if g.pid]}
    for stack in shape.unique():
        for role, pids in stack.roles().items():
            found.setdefault(role, []).extend(pids)
    found["redis"] = [redis.process.pid] if redis.process is not None else []
    return found


def with_workers(stack: Stack, samples: list[Sample]) -> list[Sample]:
    """The samples with the worker that ran each job, from the ledger."""
    ids = [s.job_id for s in samples if s.job_id and s.server]
    workers = dict(zip(ids, stack.workers_of(ids), strict=True))
    return [
        s.model_copy(update={"server": s.server.model_copy(update={"worker": workers[s.job_id]})})
        if s.job_id in workers and s.server
        else s
        for s in samples
    ]


def share(
    model: str, samples: list[Sample], shape: Shape, window: tuple[float, float]
) -> ModelShare:
    """One model's figures in a point."""
    done = [s for s in samples if s.status == "succeeded" and s.server]
    ran_by = [shape.models_of.get(s.server.worker or "") for s in done if s.server]
    measured = [
        (s.done - s.submit) * 1000 for s in done if s.done and window[0] <= s.submit <= window[1]
    ]
    return ModelShare(
        jobs=len(samples),
        succeeded=len(done),
        misrouted=sum(1 for m in ran_by if m != model),
        images_per_s=_rounded(stages.images_per_s(stages.calls_of(samples), window)),
        p50_ms=round(statistics.median(measured), 1) if measured else None,
    )


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def report(bench: ModelsBench, points: list[ShapePoint]) -> dict[str, Any]:
    """The run, its points and a summary: each shape's medians and the paired ratios."""
    summary: dict[str, Any] = {}
    figures: dict[str, Callable[[ShapePoint], float | None]] = {
        "images_per_s": lambda p: p.images_per_s,
        "images_per_core_s": lambda p: p.images_per_core_s,
    }
    for name, pick in figures.items():
        for shape in ("shared", "separate"):
            summary[f"{shape}_{name}"] = _median([pick(p) for p in points if p.shape == shape])
        ratios = paired(points, pick)
        summary[f"shared_vs_separate_{name}"] = _median(ratios)
        summary[f"shared_vs_separate_{name}_per_round"] = [round(r, 3) for r in ratios]
    for shape in ("shared", "separate"):
        for model in MODELS:
            of = [p.models[model].p50_ms for p in points if p.shape == shape]
            summary[f"{shape}_{model}_p50_ms"] = _median(of)
    summary["misrouted_jobs"] = sum(s.misrouted for p in points for s in p.models.values())
    summary["failed_jobs"] = sum(s.jobs - s.succeeded for p in points for s in p.models.values())
    plan = bench.plan
    return {
        "bench": {
            "models": list(MODELS),
            "users_per_model": bench.users,
            **plan.model_dump(
                mode="json",
                include={"width", "height", "steps", "batch", "threads", "duration_s"}
                | {"warmup_s", "rounds", "batch_timeout_s"},
            ),
        },
        "machine": machine().model_dump(),
        "versions": versions().model_dump(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "points": [p.model_dump() for p in points],
        "summary": summary,
    }


def paired(points: list[ShapePoint], pick: Callable[[ShapePoint], float | None]) -> list[float]:
    """Shared over separate, round by round (the two were measured minutes apart at most)."""
    by_round: dict[int, dict[str, float | None]] = {}
    for point in points:
        by_round.setdefault(point.round, {})[point.shape] = pick(point)
    return [
        shared / separate
        for r in by_round.values()
        if (shared := r.get("shared")) and (separate := r.get("separate"))
    ]


def _median(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.median(known), 3) if known else None
