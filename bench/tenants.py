"""`dq bench --tenants`: a light tenant beside a heavy one, under FIFO and under fair dispatch.

One run, one machine. For each dispatch rule (`DQ_DISPATCH=fifo`, the order of arrival, then
`fair`), on the batch engine, and for `fair` on the step engine (`DQ_ENGINE=step`), a fresh stack
(gateway, one worker, tiny model) is started and measured:

1. saturation: closed-loop users of the heavy tenant, the jobs per second the stack finishes;
2. idle: the light tenant alone at 5 % of saturation (Poisson): its end-to-end p50/p95;
3. flood: the heavy tenant at 2 x saturation and the light one at 5 % at once: the light
   tenant's p50/p95, and the batch fill (rows per pipeline call over the max batch size; the
   step engine has no calls of a batch, so none there).

Why the step engine: on the batch engine a light job that arrives under a flood waits for the
batch under way and then runs in a full batch, so its p95 is about two full batches whatever the
dispatch order; where a batch of N rows costs N rows (a CPU), that is 2N times a lone job's call.
On the step engine it joins the loop at the next step.

It also reports what dispatch costs the ledger per job: the Redis time of the ledger's scripts
and the round trips of a submit. The goal: under the flood, fair dispatch keeps the light
tenant's p95 within 3 x its idle p95; FIFO's figure stands beside it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from redis import Redis

from bench.load import LoadResult, LoadSpec, Sample, run_load
from bench.machine import machine, versions
from bench.plan import make_plan
from bench.system import Stack
from bench.variants import base_env
from core.embedded import EmbeddedRedis

log = logging.getLogger(__name__)

PHASES = (("fifo", "batch"), ("fair", "batch"), ("fair", "step"))  # (DQ_DISPATCH, DQ_ENGINE)
HEAVY_KEY = "bench-heavy-tenant-key-0123456789"
LIGHT_KEY = "bench-light-tenant-key-0123456789"


@dataclass
class Phase:
    """What one dispatch rule gave."""

    rule: str
    engine: str
    saturation_jobs_per_s: float
    idle_p50_s: float
    idle_p95_s: float
    flood_p50_s: float
    flood_p95_s: float
    flood_light_jobs: int
    flood_wait_p50_s: float  # the light tenant's jobs: submitted to claimed (the ledger's clock)
    flood_run_p50_s: float  # claimed to finished
    batch_fill: float | None
    script_us_per_job: float  # Redis time of the ledger's scripts over a job's life (submit, ...)
    commands_per_job: float  # Redis commands per job, the clients' reads included
    heavy_backlog_at_end: int


@dataclass
class TenantBench:
    """The scenario's knobs."""

    out: Path
    cache_dir: Path
    duration_s: float = 40.0
    saturation_s: float = 10.0
    users: int = 8
    body: dict[str, Any] = field(
        default_factory=lambda: {"prompt": "a kite", "width": 64, "height": 64, "steps": 4}
    )


def e2e(samples: list[Sample]) -> list[float]:
    """End-to-end seconds of the jobs that succeeded."""
    return sorted(s.done - s.submit for s in samples if s.status == "succeeded" and s.done)


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of sorted values; nan when empty."""
    if not values:
        return float("nan")
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def spec(stack: Stack, bench: TenantBench, key: str, **load: Any) -> LoadSpec:
    """A load point on `stack` for the tenant of `key`."""
    return LoadSpec(url=stack.url, api_key=key, body=bench.body, drain_s=300, **load)


def batch_fill(results: list[LoadResult], max_batch: int) -> float:
    """Rows per pipeline call over the max batch size, over every job that ran."""
    sizes = {
        s.server.batch_id: s.server.batch_size
        for r in results
        for s in r.samples
        if s.server and s.server.batch_id and s.server.batch_size
    }
    return statistics.fmean(sizes.values()) / max_batch if sizes else float("nan")


def stage(samples: list[Sample], which: str) -> list[float]:
    """Sorted seconds of the succeeded jobs' "wait" (created to claimed) or "run" (claimed to
    finished), from their records."""
    times = [s.server for s in samples if s.status == "succeeded" and s.server]
    spans = [
        (t.started - t.created) if which == "wait" else (t.finished - t.started)
        for t in times
        if t.started and t.finished
    ]
    return sorted(spans)


def ledger_cost(redis: Redis, jobs: int) -> tuple[float, float]:
    """Microseconds of the ledger's scripts per job, and commands per job (round trips)."""
    stats = redis.info("commandstats")
    scripts = stats.get("cmdstat_evalsha", {}).get("usec", 0) + stats.get("cmdstat_eval", {}).get(
        "usec", 0
    )
    calls = sum(v.get("calls", 0) for v in stats.values())
    return scripts / max(1, jobs), calls / max(1, jobs)


def phase(
    bench: TenantBench, rule: str, engine: str, redis: EmbeddedRedis, db: int, logs: Path
) -> Phase:
    """Measure one dispatch rule on one engine, on a fresh stack."""
    plan = make_plan("quick", bench.out, bench.cache_dir)
    env = base_env(plan, bench.out / rule)
    env.update(
        {
            "DQ_API_KEYS": f"heavy:{HEAVY_KEY},light:{LIGHT_KEY}",
            "DQ_DISPATCH": rule,
            "DQ_ENGINE": engine,
            "DQ_TENANT_MAX_QUEUED": "0",
        }
    )
    stack = Stack(f"{rule}-{engine}", redis, db, env).start(1, logs)
    try:
        stack.wait_ready()
        sat = asyncio.run(
            run_load(
                spec(stack, bench, HEAVY_KEY, users=bench.users, duration_s=bench.saturation_s)
            )
        )
        finished = [s for s in sat.samples if s.status == "succeeded"]
        saturation = len(finished) / max(1e-9, sat.ended - sat.started)
        light_rate = 0.05 * saturation
        idle = asyncio.run(
            run_load(
                spec(stack, bench, LIGHT_KEY, rate=light_rate, duration_s=bench.duration_s, seed=1)
            )
        )
        client = Redis.from_url(stack.redis_url, decode_responses=True)
        client.config_resetstat()

        async def flood() -> tuple[LoadResult, LoadResult]:
            heavy = run_load(
                spec(
                    stack,
                    bench,
                    HEAVY_KEY,
                    rate=2 * saturation,
                    duration_s=bench.duration_s,
                    seed=2,
                )
            )
            light = run_load(
                spec(stack, bench, LIGHT_KEY, rate=light_rate, duration_s=bench.duration_s, seed=3)
            )
            return await asyncio.gather(heavy, light)

        heavy, light = asyncio.run(flood())
        jobs = len(heavy.samples) + len(light.samples)
        script_us, commands = ledger_cost(client, jobs)
        backlog = int(client.hget("dq:stats", "queued") or 0)
        idle_e2e, flood_e2e = e2e(idle.samples), e2e(light.samples)
        return Phase(
            rule=rule,
            engine=engine,
            saturation_jobs_per_s=round(saturation, 3),
            idle_p50_s=round(pct(idle_e2e, 0.5), 3),
            idle_p95_s=round(pct(idle_e2e, 0.95), 3),
            flood_p50_s=round(pct(flood_e2e, 0.5), 3),
            flood_p95_s=round(pct(flood_e2e, 0.95), 3),
            flood_light_jobs=len(flood_e2e),
            flood_wait_p50_s=round(pct(stage(light.samples, "wait"), 0.5), 3),
            flood_run_p50_s=round(pct(stage(light.samples, "run"), 0.5), 3),
            batch_fill=(
                round(batch_fill([heavy, light], plan.batch), 3) if engine == "batch" else None
            ),
            script_us_per_job=round(script_us, 1),
            commands_per_job=round(commands, 1),
            heavy_backlog_at_end=backlog,
        )
    finally:
        stack.stop()


def run_tenants(bench: TenantBench) -> int:
    """FIFO and fair on the batch engine, fair on the step engine: one report."""
    bench.out.mkdir(parents=True, exist_ok=True)
    logs = bench.out / "logs"
    logs.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        redis = EmbeddedRedis(Path(folder)).start()
        try:
            phases = [
                phase(bench, rule, engine, redis, db, logs)
                for db, (rule, engine) in enumerate(PHASES)
            ]
        finally:
            redis.stop()
    fifo, fair, step = phases
    report = {
        "command": "dq bench --tenants",
        "machine": machine().model_dump(mode="json"),
        "versions": versions().model_dump(mode="json"),
        "phases": [asdict(p) for p in phases],
        "fair_p95_over_idle_p95": round(fair.flood_p95_s / fair.idle_p95_s, 2),
        "fifo_p95_over_idle_p95": round(fifo.flood_p95_s / fifo.idle_p95_s, 2),
        "fair_step_p95_over_idle_p95": round(step.flood_p95_s / step.idle_p95_s, 2),
        "fair_fill_over_fifo_fill": round((fair.batch_fill or 0) / (fifo.batch_fill or 1), 3),
        "at": time.time(),
    }
    (bench.out / "tenants.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0
