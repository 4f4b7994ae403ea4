"""One CPU run of the bench: start every variant side by side, measure them in turn, stop them.

Everything starts at once (loading models overlaps) and then waits idle while one variant at a
time is measured, saturation points first and close together, so that the ratios compare figures
taken minutes apart at most on a machine whose background load drifts.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import sys
import time
from contextlib import ExitStack

from bench.burst import BurstResult, BurstSpec
from bench.cpu import Meter
from bench.direct import Direct, DirectResult
from bench.generator import LoadGenerator
from bench.load import LoadResult, LoadSpec
from bench.machine import machine, model_hash, versions
from bench.peer import Peer
from bench.plan import Plan, Served, Variant
from bench.points import Point, point_of
from bench.report import ModelInfo, Report, created_now, summarize, targets, write
from bench.system import API_KEY, Moto, Stack
from bench.variants import (
    DATABASES,
    STACKS,
    base_env,
    cpu_sharing,
    direct_spec,
    job_body,
    schedule,
    stack_env,
)
from core.embedded import EmbeddedRedis

log = logging.getLogger(__name__)


class Suite:
    """Owns the processes of one run and the figures they produced."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.work, self.logs = plan.out / "work", plan.out / "logs"
        self.redis: EmbeddedRedis | None = None
        self.moto: Moto | None = None
        self.stacks: dict[Variant, Stack] = {}
        self.peer: Peer | None = None
        self.direct: Direct | None = None
        self.load = LoadGenerator()
        self.points: list[Point] = []
        self.skipped: dict[str, str] = {}

    def run(self) -> Report:
        """Start, measure, stop, report."""
        began = time.monotonic()
        with ExitStack() as cleanup:
            # Last out: the Redis files and images of the run; the logs stay beside the report.
            cleanup.callback(shutil.rmtree, self.work, ignore_errors=True)
            self._start(cleanup)
            direct = self._measure_direct()
            self._measure_closed(saturated=True)
            direct = self._measure_direct(direct)
            self._measure_closed(saturated=False)
            self._measure_open()
            burst = self._measure_gateway()
        return self._report(direct, burst, time.monotonic() - began)

    # --- starting --------------------------------------------------------------------------

    def _start(self, cleanup: ExitStack) -> None:
        plan = self.plan
        cleanup.callback(self.load.stop)
        self.load.start()
        if plan.wants("direct"):
            self.direct = Direct(direct_spec(plan)).start()
            cleanup.callback(self.direct.stop)
            if not (plan.model_cache / plan.model / "model_index.json").is_file():
                self.direct.wait_ready()  # it builds the model once, before anyone else loads it
        if plan.url is None:
            self._start_stacks(cleanup)
        if plan.wants("peer") and importlib.util.find_spec("litserve") is None:
            self.skipped["peer"] = "litserve is not installed: pip install 'diffusion-queue[bench]'"
        elif plan.wants("peer"):
            self.peer = Peer(direct_spec(plan), plan.batch, plan.batch_timeout_s).start(self.logs)
            cleanup.callback(self.peer.stop)
        self._wait_ready()

    def _start_stacks(self, cleanup: ExitStack) -> None:
        self.redis = EmbeddedRedis(self.work / "redis").start()
        cleanup.callback(self.redis.stop)
        if self.plan.storage == "moto":
            self.moto = Moto(self.logs)
            cleanup.callback(self.moto.child.stop)
            self.moto.wait_ready()
        env = base_env(self.plan, self.work)
        for name in STACKS:
            if self.plan.wants(name):
                overrides = env | self._storage(name) | stack_env(self.plan, name)
                stack = Stack(name, self.redis, DATABASES[name], overrides)
                cleanup.callback(stack.stop)
                # The gateway alone has no model beside it: it gets a process per core.
                alone = name == "gateway"
                workers = 0 if alone else self.plan.workers
                self.stacks[name] = stack.start(workers, self.logs, 2 if alone else 1)

    def _storage(self, name: str) -> dict[str, str]:
        if self.moto is not None:
            return self.moto.stack_env(name)
        if self.plan.storage.startswith("s3://"):
            return {"DQ_STORAGE_URL": f"{self.plan.storage.rstrip('/')}/{name}"}
        return {"DQ_STORAGE_URL": (self.work / "images" / name).resolve().as_uri()}

    def _wait_ready(self) -> None:
        began = time.monotonic()
        if self.direct is not None:
            self.direct.wait_ready()
        for stack in self.stacks.values():
            stack.wait_ready()
        if self.peer is not None:
            self.peer.wait_ready()
            self.peer.pause()
        log.info("everything ready in %.1f s", time.monotonic() - began)

    # --- measuring -------------------------------------------------------------------------

    def _measure_direct(self, before: DirectResult | None = None) -> DirectResult | None:
        """Measure direct; the second time, merge with the first and stop its process."""
        if self.direct is None:
            self.skipped["direct"] = "not asked for"
            return None
        result = self.direct.measure()
        for p in result.points:
            log.info("direct batch %d: %.2f images/s", p.batch_size, p.images_per_s)
        if before is None:
            return result
        self.direct.stop()  # its memory and threads are not needed any more
        return before.merged(result)

    def _measure_closed(self, *, saturated: bool) -> None:
        """The saturation points (side by side with direct, in rounds), or all the others."""
        points = [
            (variant, users)
            for variant, users in schedule(self.plan)
            if (variant != "peer" or self.peer is not None)
            and (users == self.plan.saturation_users) == saturated
        ]
        for round_ in range(self.plan.rounds if saturated else 1):
            for variant, users in points:
                self._point(variant, users=users, round_=round_)

    def _measure_open(self) -> None:
        variants: tuple[Served, ...] = (
            ("system", "peer") if self.plan.mode == "full" else ("system",)
        )
        for variant in variants:
            if self.plan.wants(variant) and (variant != "peer" or self.peer is not None):
                for rate in self._rates():
                    self._point(variant, rate=rate)

    def _rates(self) -> tuple[float, ...]:
        """The given rates, or fractions of the batched system's saturation throughput."""
        if self.plan.rates:
            return self.plan.rates
        sat = max((p.images_per_s or 0.0 for p in self.points if p.variant == "system"), default=0)
        return tuple(round(f * sat, 3) for f in self.plan.load_fractions) if sat else ()

    def _measure_gateway(self) -> BurstResult | None:
        stack = self.stacks.get("gateway")
        if stack is None:
            self.skipped["gateway"] = "not asked for" if self.plan.url is None else "--url given"
            return None
        spec = BurstSpec(
            url=stack.url,
            api_key=API_KEY,
            clients=self.plan.gateway_clients,
            duration_s=self.plan.gateway_duration_s,
            rate=self.plan.gateway_rate,
            body=job_body(self.plan) | {"seed": 1},
        )
        result = self.load.burst(spec)
        stack.flush()
        log.info(
            "gateway alone, %d clients: %.0f submits/s at most; at %.0f/s offered %.0f/s, p99 "
            "%.1f ms; %.0f polls/s",
            spec.clients,
            result.capacity.per_s,
            spec.rate,
            result.paced.per_s,
            result.paced.latency_ms.p99 or 0.0,
            result.poll.per_s,
        )
        return result

    def _target(self, variant: Served) -> tuple[str, str | None]:
        """The URL and key a variant is driven at."""
        if variant == "peer":
            assert self.peer is not None, "the peer did not start"
            return self.peer.url, None
        if self.plan.url is not None:
            return self.plan.url, self.plan.api_key
        return self.stacks[variant].url, API_KEY

    def _duration(self, variant: Served, users: int) -> float:
        """Long enough for a few jobs even when each waits out the fixed timeout."""
        if variant == "fixed" and users < self.plan.batch:
            return max(self.plan.duration_s, self.plan.warmup_s + 3 * self.plan.fixed_timeout_s + 1)
        return self.plan.duration_s

    def _point(
        self, variant: Served, *, users: int = 0, rate: float = 0.0, round_: int = 0
    ) -> Point:
        url, key = self._target(variant)
        spec = LoadSpec(
            url=url,
            protocol="peer" if variant == "peer" else "dq",
            api_key=key,
            users=users,
            rate=rate,
            duration_s=self._duration(variant, users),
            poll_s=self.plan.poll_s,
            wait=self.plan.wait,
            body=job_body(self.plan),
            seed=len(self.points) * 1_000_000,
        )
        if variant == "peer" and self.peer is not None:
            self.peer.resume()
            time.sleep(0.5)  # let its processes notice the time they lost
        meter = Meter(self._roles(variant)).start()
        result = self.load.run(spec)
        cpu = meter.read()
        if variant == "peer" and self.peer is not None:
            self.peer.pause()
        self._attach_workers(variant, result)
        max_batch = 1 if variant == "unbatched" else self.plan.batch
        point = point_of(
            variant,
            result,
            max_batch=max_batch,
            warmup_s=self.plan.warmup_s,
            cpu=cpu,
            round_=round_,
        )
        self.points.append(point)
        self._log_point(point)
        return point

    def _roles(self, variant: Served) -> dict[str, list[int]]:
        roles: dict[str, list[int]] = {"loadgen": [self.load.pid] if self.load.pid else []}
        if variant == "peer" and self.peer is not None:
            return roles | self.peer.roles()
        if variant in self.stacks:
            roles |= self.stacks[variant].roles()
        if self.redis is not None and self.redis.process is not None:
            roles["redis"] = [self.redis.process.pid]
        if self.moto is not None:
            roles["storage"] = [self.moto.child.pid]
        return roles

    def _attach_workers(self, variant: Served, result: LoadResult) -> None:
        """Which worker ran each job, read from the ledger (only when the bench owns it)."""
        stack = self.stacks.get(variant)
        finished = [s for s in result.samples if s.job_id and s.server]
        if stack is None or not finished:
            return
        for sample, worker in zip(
            finished, stack.workers_of([s.job_id or "" for s in finished]), strict=True
        ):
            assert sample.server is not None
            sample.server.worker = worker

    def _log_point(self, p: Point) -> None:
        e2e = p.stages_ms.get("e2e")
        load = f"users={p.users}" if p.users else f"rate={p.rate}/s"
        log.info(
            "%s %s: %s images/s, e2e p50 %s ms, fill %s, %d jobs (%d errors), cpu %s",
            p.variant,
            load,
            f"{p.images_per_s:.2f}" if p.images_per_s else "-",
            f"{e2e.p50:.0f}" if e2e and e2e.p50 is not None else "-",
            f"{p.batch_fill:.2f}" if p.batch_fill is not None else "-",
            p.counts.jobs,
            p.counts.error + p.counts.timeout + p.counts.failed,
            p.cpu_cores,
        )

    # --- reporting -------------------------------------------------------------------------

    def _report(
        self, direct: DirectResult | None, burst: BurstResult | None, wall: float
    ) -> Report:
        plan = self.plan
        summary = summarize(plan, direct, self.points, burst)
        report = Report(
            created_at=created_now(),
            command=["dq", "bench", *sys.argv[1:]],
            plan=plan,
            machine=machine(),
            versions=versions(),
            model=self._model_info(direct),
            cpu_sharing=cpu_sharing(plan),
            direct=direct,
            points=self.points,
            gateway=burst,
            summary=summary,
            targets=targets(summary),
            charts=[],
            skipped=self.skipped,
            wall_s=round(wall, 1),
        )
        charts = self._charts(report)
        report = report.model_copy(update={"charts": charts, "skipped": dict(self.skipped)})
        write(report, plan.out)
        return report

    def _charts(self, report: Report) -> list[str]:
        try:
            from bench.charts import draw_all
        except ImportError:
            self.skipped["charts"] = (
                "matplotlib is not installed: pip install 'diffusion-queue[bench]'"
            )
            return []
        return draw_all(report, self.plan.out)

    def _model_info(self, direct: DirectResult | None) -> ModelInfo:
        plan = self.plan
        return ModelInfo(
            name=plan.model,
            config_hash=model_hash(plan.model_cache, plan.model),
            width=plan.width,
            height=plan.height,
            steps=plan.steps,
            guidance_scale=plan.guidance_scale,
            dtype=direct.dtype if direct else plan.dtype or "auto",
            device=direct.device if direct else plan.device or "auto",
        )
