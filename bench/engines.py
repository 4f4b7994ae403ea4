"""`dq bench --engines`: the step engine against the batch engine and LitServe, under mixed load.

Three servers of one model start side by side: a stack (gateway, worker) with `DQ_ENGINE=step`, one
with `DQ_ENGINE=batch`, and LitServe serving the worker's pipeline with the same batch size and
timeout (bench/litapi.py; a call per bucket of its batch). All get the same mixed traffic: 4, 8 or
16 steps, two guidance scales, 30 % of the jobs at a second size. One server is driven at a time
(the others idle, LitServe frozen):

- saturation: closed-loop users keeping every server full (in rounds taken in turn); images/s.
  The batch engine's is the reference load;
- a lone job: one user, one kind of job, end to end;
- Poisson arrivals at 50 %, 80 % and 95 % of the reference, the same rates for all three:
  end-to-end p50/p95/p99 and images/s.

Written to DIR/engines.json with a chart of latency against load (DIR/engines.png).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from bench.cpu import Meter
from bench.engine_figures import (
    ENGINES,
    Engine,
    EnginePoint,
    figures,
    fmt,
    median,
    summarize,
    table,
)
from bench.generator import LoadGenerator
from bench.load import LoadSpec
from bench.machine import machine, versions
from bench.peer import Peer
from bench.plan import Plan, make_plan
from bench.system import API_KEY, Stack
from bench.variants import base_env, direct_spec, job_body
from core.embedded import EmbeddedRedis
from core.settings import load_settings

log = logging.getLogger(__name__)

STEPS = (4, 8, 16)
GUIDANCE = (7.5, 3.0)
OTHER_SHARE = 3  # in 10: jobs at the second size
# About ten minutes on 2 cores: open-loop points long enough for a p95 at a job or two a second.
SHORT = {"duration_s": 30.0, "warmup_s": 5.0, "rounds": 2, "load_fractions": (0.5, 0.8, 0.95)}


@dataclass(frozen=True)
class EnginesBench:
    """What to measure with: the quick plan's model knobs, these durations, rounds and loads."""

    plan: Plan
    lone_steps: int = 8  # the lone job: the middle of the mix, at the plan's size and guidance
    mix: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def of(cls, args: argparse.Namespace) -> EnginesBench:
        """The settings `dq bench --engines` was given, and the short defaults for the rest."""
        given = {
            "model": args.model,
            "device": args.device,
            "dtype": args.dtype,
            "width": args.size,
            "height": args.size,
            "batch": args.batch,
            "batch_timeout_s": args.batch_timeout_s,
            "threads": args.threads,
            "duration_s": args.duration_s,
            "warmup_s": args.warmup_s,
            "rounds": args.rounds,
            "load_fractions": args.load_fractions,
            "users": args.users,
        }
        cache = args.model_cache or load_settings().model_cache
        chosen = {**SHORT, **{k: v for k, v in given.items() if v is not None}}
        plan = make_plan("quick", args.out, cache, **chosen)
        return cls(plan, mix=mixed(plan))


def mixed(plan: Plan) -> list[dict[str, Any]]:
    """The traffic's job kinds, each as likely: steps x guidance x size (30 % the second size)."""
    side = (plan.width * 3 // 2) // 8 * 8, (plan.height * 3 // 2) // 8 * 8
    sizes: list[dict[str, int]] = [{}] * (10 - OTHER_SHARE) + [
        {"width": side[0], "height": side[1]}
    ] * OTHER_SHARE
    return [
        {"steps": s, "guidance_scale": g, **size} for s in STEPS for g in GUIDANCE for size in sizes
    ]


@dataclass
class Servers:
    """The two stacks and LitServe, and the one Redis the stacks share."""

    redis: EmbeddedRedis
    stacks: dict[Engine, Stack]
    peer: Peer | None

    def url(self, engine: Engine) -> tuple[str, str | None]:
        """Where an engine is driven, and with which key."""
        if engine == "peer":
            assert self.peer is not None
            return self.peer.url, None
        return self.stacks[engine].url, API_KEY

    def roles(self, engine: Engine) -> dict[str, list[int]]:
        """Process ids by role, for CPU accounting: the engine's server and Redis."""
        redis = [self.redis.process.pid] if self.redis.process is not None else []
        if engine == "peer":
            return self.peer.roles() if self.peer is not None else {}
        return self.stacks[engine].roles() | {"redis": redis}

    def engines(self) -> list[Engine]:
        """The servers that run."""
        return [e for e in ENGINES if e in self.stacks or (e == "peer" and self.peer)]

    def stop(self) -> None:
        """Stop everything (workers drain)."""
        if self.peer is not None:
            self.peer.stop()
        for stack in self.stacks.values():
            stack.stop()
        self.redis.stop()


def start(plan: Plan, work: Path, skipped: dict[str, str]) -> Servers:
    """Start the three servers, the model built once first; wait until all are ready."""
    logs = plan.out / "logs"
    servers = Servers(EmbeddedRedis(work / "redis").start(), {}, None)
    try:
        built = (plan.model_cache / plan.model / "model_index.json").is_file()
        for db, engine in enumerate(ENGINES[:2], start=1):
            images = (work / "images" / engine).resolve().as_uri()
            env = base_env(plan, work) | {"DQ_ENGINE": engine, "DQ_STORAGE_URL": images}
            stack = Stack(engine, servers.redis, db, env).start(plan.workers, logs)
            servers.stacks[engine] = stack
            if not built:  # the first worker builds the model; the others then load it
                stack.wait_ready()
                built = True
        if importlib.util.find_spec("litserve") is None:
            skipped["peer"] = "litserve is not installed: pip install 'diffusion-queue[bench]'"
        else:
            servers.peer = Peer(direct_spec(plan), plan.batch, plan.batch_timeout_s).start(logs)
        for stack in servers.stacks.values():
            stack.wait_ready()
        if servers.peer is not None:
            servers.peer.wait_ready()
            servers.peer.pause()
    except BaseException:
        servers.stop()
        raise
    return servers


class Run:
    """One run's load generator, servers and points."""

    def __init__(self, bench: EnginesBench, servers: Servers, load: LoadGenerator) -> None:
        self.bench, self.servers, self.load = bench, servers, load
        self.points: list[EnginePoint] = []

    def measure(self) -> None:
        """Saturation and the lone job in rounds, then the open-loop loads. The engines take
        turns, and each gets the same jobs at the same times (one seed per point, not engine)."""
        plan, engines = self.bench.plan, self.servers.engines()
        users = plan.saturation_users
        for round_ in range(plan.rounds):
            for engine in engines:
                self.point(engine, "saturation", users=users, round_=round_, seed=round_)
        lone = [{"steps": self.bench.lone_steps}]
        for round_ in range(plan.rounds):
            for engine in engines:
                self.point(engine, "lone", users=1, round_=round_, mix=lone, seed=100 + round_)
        reference = median(self.saturation("batch"))
        if not reference:
            log.warning("no saturation figure for the batch engine: no open-loop points")
            return
        for i, fraction in enumerate(sorted(plan.load_fractions)):
            rate = round(fraction * reference, 3)
            for engine in engines:
                self.point(engine, "load", rate=rate, fraction=fraction, seed=200 + i)

    def saturation(self, engine: Engine) -> list[float | None]:
        """An engine's saturation images/s, round by round."""
        return [
            p.images_per_s for p in self.points if p.engine == engine and p.kind == "saturation"
        ]

    def point(
        self,
        engine: Engine,
        kind: Literal["saturation", "lone", "load"],
        *,
        users: int = 0,
        rate: float = 0.0,
        fraction: float | None = None,
        round_: int = 0,
        mix: list[dict[str, Any]] | None = None,
        seed: int = 0,
    ) -> EnginePoint:
        """Drive one server at one load; its figures. A lone job's points are half as long."""
        plan, peer = self.bench.plan, self.servers.peer
        url, key = self.servers.url(engine)
        spec = LoadSpec(
            url=url,
            protocol="peer" if engine == "peer" else "dq",
            api_key=key,
            users=users,
            rate=rate,
            duration_s=plan.duration_s / 2 if kind == "lone" else plan.duration_s,
            poll_s=plan.poll_s,
            wait=plan.wait,
            body=job_body(plan),
            mix=self.bench.mix if mix is None else mix,
            seed=seed * 1_000_000,
        )
        if engine == "peer" and peer is not None:
            peer.resume()
            time.sleep(0.5)  # let its processes notice the time they lost
        meter = Meter(self.servers.roles(engine) | {"loadgen": [self.load.pid or 0]}).start()
        try:
            result = self.load.run(spec)
        finally:
            if engine == "peer" and peer is not None:
                peer.pause()
        point = figures(engine, kind, result, plan.warmup_s, round_=round_, fraction=fraction)
        point.cpu_cores = meter.read()
        self.points.append(point)
        log.info(
            "%s %s%s: %s images/s, e2e p50 %s p95 %s ms, %d jobs (%d errors)",
            engine,
            kind,
            f" {fraction:.0%} ({rate:.2f}/s)" if fraction is not None else f" users={users}",
            fmt(point.images_per_s, ".2f"),
            fmt(point.e2e_ms.p50, ".0f"),
            fmt(point.e2e_ms.p95, ".0f"),
            point.jobs,
            point.errors,
        )
        return point


def report(
    bench: EnginesBench, points: list[EnginePoint], skipped: dict[str, str]
) -> dict[str, Any]:
    """The run, its points and its summary, as written to engines.json."""
    plan = bench.plan
    reference = median(
        [p.images_per_s for p in points if p.engine == "batch" and p.kind == "saturation"]
    )
    return {
        "bench": {
            "engines": [e for e in ENGINES if e not in skipped],
            "mix": {
                "steps": STEPS,
                "guidance_scale": GUIDANCE,
                "other_size_share": OTHER_SHARE / 10,
            },
            "lone_steps": bench.lone_steps,
            "reference_jobs_per_s": reference,
            **plan.model_dump(
                mode="json",
                include={"model", "width", "height", "guidance_scale", "batch", "threads"}
                | {"batch_timeout_s", "duration_s", "warmup_s", "rounds", "load_fractions"},
            ),
            "saturation_users": plan.saturation_users,
        },
        "machine": machine().model_dump(),
        "versions": versions().model_dump(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "skipped": skipped,
        "points": [p.model_dump() for p in points],
        "summary": summarize(points),
    }


def run_engines(bench: EnginesBench) -> int:
    """Start the servers, measure, stop them; write engines.json and the chart; 0 when done."""
    plan = bench.plan
    work = plan.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    skipped: dict[str, str] = {}
    load = LoadGenerator().start()
    try:
        servers = start(plan, work, skipped)
        try:
            run = Run(bench, servers, load)
            run.measure()
        finally:
            servers.stop()
    finally:
        load.stop()
        shutil.rmtree(work, ignore_errors=True)
    try:
        from bench.charts import engines_chart
    except ImportError:
        skipped["chart"] = "matplotlib is not installed: pip install 'diffusion-queue[bench]'"
    else:
        engines_chart(run.points, plan, plan.out / "engines.png")
    figures_ = report(bench, run.points, skipped)
    (plan.out / "engines.json").write_text(json.dumps(figures_, indent=2))
    print(table(run.points, figures_["summary"]))
    return 0
