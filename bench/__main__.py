"""`python -m bench` (`dq bench`): measure the system against its baselines on this machine.

Quick mode (the default) finishes in about two minutes on two cores; --full sweeps load for longer;
--gpu measures the SD 1.5-shaped model on a CUDA card. Writes DIR/report.json and PNG charts.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TypeVar

from bench import BenchError
from bench.plan import VARIANTS, Mode, Plan, Variant, make_plan
from bench.report import Report
from core.errors import ServiceError
from core.settings import load_settings

log = logging.getLogger("bench")
T = TypeVar("T")


def _list(kind: Callable[[str], T]) -> Callable[[str], tuple[T, ...]]:
    """An argparse type for comma-separated values."""
    return lambda raw: tuple(kind(v) for v in raw.split(",") if v.strip())


def _variants(raw: str) -> tuple[Variant, ...]:
    names = _list(str)(raw)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {unknown}: pick from {VARIANTS}")
    return tuple(n for n in VARIANTS if n in names)


def parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(prog="dq bench", description=__doc__)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick")
    mode.add_argument("--full", dest="mode", action="store_const", const="full")
    mode.add_argument("--gpu", dest="mode", action="store_const", const="gpu")
    mode.add_argument(
        "--adapters",
        dest="mode",
        action="store_const",
        const="adapters",
        help="LoRA switch cost and img2img/inpaint throughput, in one process (bench/adapters.py)",
    )
    mode.add_argument(
        "--tenants",
        dest="mode",
        action="store_const",
        const="tenants",
        help="a light tenant beside a flooding one, FIFO against fair dispatch (bench/tenants.py)",
    )
    mode.add_argument(
        "--models",
        dest="mode",
        action="store_const",
        const="models",
        help="mixed traffic over two models: one deployment against two (bench/models.py)",
    )
    mode.add_argument(
        "--engines",
        dest="mode",
        action="store_const",
        const="engines",
        help="the step engine against the batch engine and LitServe under mixed Poisson load "
        "(bench/engines.py)",
    )
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="report folder")
    p.add_argument("--url", help="measure a running gateway instead of starting one")
    p.add_argument("--api-key", help="bearer key for --url")
    model = p.add_argument_group("model")
    model.add_argument("--model", help="tiny, sd15-random, a diffusers id or a path")
    model.add_argument("--model-cache", type=Path, help="default: DQ_MODEL_CACHE")
    model.add_argument("--device", help="cpu, cuda, cuda:N (default: auto)")
    model.add_argument("--dtype", help="fp32, fp16, bf16 (default: auto)")
    model.add_argument("--size", type=int, help="image side in pixels")
    model.add_argument("--steps", type=int)
    model.add_argument("--guidance", type=float, dest="guidance_scale")
    model.add_argument("--threads", type=int, help="the model's CPU threads (DQ_CPU_THREADS)")
    batching = p.add_argument_group("batching")
    batching.add_argument("--batch", type=int, help="max batch size")
    batching.add_argument("--batch-timeout", type=float, dest="batch_timeout_s")
    batching.add_argument("--fixed-timeout", type=float, dest="fixed_timeout_s")
    batching.add_argument("--workers", type=int)
    batching.add_argument("--storage", help="file, moto (S3 on loopback) or s3://bucket/prefix")
    load = p.add_argument_group("load")
    load.add_argument("--users", type=_list(int), help="closed-loop users, e.g. 1,8")
    load.add_argument("--rates", type=_list(float), help="open-loop jobs/s, e.g. 1,2.5")
    load.add_argument("--load-fractions", type=_list(float), help="rates as x saturation")
    load.add_argument("--duration", type=float, dest="duration_s", help="seconds per point")
    load.add_argument("--warmup", type=float, dest="warmup_s", help="seconds not measured")
    load.add_argument("--poll-ms", type=float, help="client poll interval")
    load.add_argument(
        "--wait",
        choices=("hold", "eta", "fixed"),
        help="hold (default): long-poll, answered when the job ends; "
        "eta: sleep through the job's ETA, then poll; fixed: poll all along",
    )
    load.add_argument("--repeats", type=int, dest="direct_repeats", help="direct calls per size")
    load.add_argument("--rounds", type=int, help="times the saturation points are taken in turn")
    load.add_argument("--gateway-clients", type=int)
    load.add_argument("--gateway-rate", type=float, help="paced submits/s (default 1500)")
    load.add_argument("--gateway-duration", type=float, dest="gateway_duration_s")
    p.add_argument("--only", type=_variants, help=f"variants to run, of {','.join(VARIANTS)}")
    p.add_argument("--skip", type=_variants, help="variants not to run")
    p.add_argument("--gpu-batches", type=_list(int), help="GPU mode batch sizes, e.g. 1,4,8")
    p.add_argument(
        "--no-compile",
        dest="gpu_compile",
        action="store_const",
        const=False,
        help="GPU mode: skip the torch.compile figures",
    )
    return p


def plan_of(args: argparse.Namespace) -> Plan:
    """The plan the command line asks for."""
    given = dict(vars(args))
    mode: Mode = given.pop("mode") or "quick"
    out: Path = given.pop("out")
    cache = given.pop("model_cache") or load_settings().model_cache
    size, poll_ms = given.pop("size"), given.pop("poll_ms")
    only, skip = given.pop("only"), given.pop("skip") or ()
    variants = tuple(v for v in (only or VARIANTS) if v not in skip)
    return make_plan(
        mode,
        out,
        cache,
        width=size,
        height=size,
        poll_s=None if poll_ms is None else poll_ms / 1000,
        variants=variants,
        **given,
    )


def show(report: Report) -> None:
    """The summary and the targets, on stdout."""
    print(report.summary.model_dump_json(indent=2, exclude_none=True))
    for t in report.targets:
        verdict = {True: "met", False: "MISSED", None: "not measured"}[t.met]
        value = "-" if t.value is None else f"{t.value:.3f}"
        print(f"{t.name:28} {value:>10}  target {t.target:45} {verdict}")


@contextmanager
def stopped_cleanly() -> Iterator[None]:
    """Turn SIGTERM into SystemExit, so the processes the bench started are stopped too."""

    def leave(_signum: int, _frame: FrameType | None) -> None:
        sys.exit(143)

    previous = signal.signal(signal.SIGTERM, leave)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """Run the bench; 0 on success (targets missed included), 1 when it could not run."""
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per readiness probe otherwise
    try:
        if args.mode == "tenants":
            from bench.tenants import TenantBench, run_tenants

            cache = args.model_cache or load_settings().model_cache
            duration = args.duration_s or TenantBench.duration_s
            return run_tenants(TenantBench(args.out, cache, duration_s=duration))
        if args.mode == "adapters":
            from bench.adapters import AdapterBench, run_adapters

            return run_adapters(AdapterBench.of(args))
        if args.mode == "engines":
            from bench.engines import EnginesBench, run_engines

            with stopped_cleanly():
                return run_engines(EnginesBench.of(args))
        if args.mode == "models":
            from bench.models import ModelsBench, run_models

            with stopped_cleanly():
                return run_models(ModelsBench.of(args))
        plan = plan_of(args)
        with stopped_cleanly():
            if plan.mode == "gpu":
                from bench.gpu import run_gpu

                return run_gpu(plan)
            from bench.suite import Suite

            report = Suite(plan).run()
    except (BenchError, ServiceError) as e:
        log.error("%s", e.message)
        return 1
    show(report)
    log.info("report: %s", plan.out / "report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
