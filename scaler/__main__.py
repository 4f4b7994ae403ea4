"""`python -m scaler`: the autoscaler and reaper; `python -m scaler simulate …`: the simulator."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import TypeVar

from core import connections
from core.catalog import Catalog
from core.errors import ConfigError
from core.recovery import Recovery, RecoveryConfig
from core.settings import Settings, load_settings
from core.storage import open_store
from core.store import JobStore, Ledger
from scaler.backends import DockerBackend, KubernetesBackend, ScaleBackend
from scaler.loop import ControlLoop
from scaler.policy import PolicyConfig
from scaler.pools import named, pooled, pools_of
from scaler.process import ProcessBackend
from scaler.signals import Reading

log = logging.getLogger("scaler")
T = TypeVar("T")


def parser() -> argparse.ArgumentParser:
    """Flags override the DQ_SCALER_* settings."""
    p = argparse.ArgumentParser(prog="dq scaler", description=__doc__)
    p.add_argument("--backend", choices=["process", "docker", "kubernetes"])
    p.add_argument(
        "--min", type=int, dest="min_workers", help="the default model's fewest workers (0: none)"
    )
    p.add_argument("--max", type=int, dest="max_workers", help="the default model's most workers")
    p.add_argument("--interval", type=float, dest="interval_s", help="seconds between ticks")
    return p


def policy_of(settings: Settings, args: argparse.Namespace) -> PolicyConfig:
    """The policy's knobs from settings, with command-line overrides (each pool has its bounds)."""
    return PolicyConfig(
        interval_s=_pick(args.interval_s, settings.scaler_interval_s),
        target_wait_s=settings.scaler_target_wait_s,
        down_window_s=settings.scaler_down_window_s,
        cooldown_s=settings.scaler_cooldown_s,
        max_step_up=settings.scaler_max_step_up,
    )


def _pick(flag: T | None, setting: T) -> T:
    return setting if flag is None else flag


def backends_of(
    name: str, settings: Settings
) -> tuple[Callable[[str], ScaleBackend], str | None, ProcessBackend | None]:
    """How to reach a model's workers, the backend's name pattern, and the local processes."""
    drain_s, timeout_s = settings.scaler_drain_timeout_s, settings.scaler_backend_timeout_s
    if name == "docker":
        pattern = settings.scaler_docker_service

        def docker(model: str) -> ScaleBackend:
            service = named(pattern, model)
            return DockerBackend(
                settings.scaler_docker_project,
                service,
                timeout_s=timeout_s,
                stop_timeout_s=int(drain_s),
            )

        return docker, pattern, None
    if name == "kubernetes":
        pattern = settings.scaler_k8s_deployment

        def kubernetes(model: str) -> ScaleBackend:
            namespace = settings.scaler_k8s_namespace
            return KubernetesBackend(named(pattern, model), namespace, timeout_s=timeout_s)

        return kubernetes, pattern, None
    gpus = [g for g in settings.scaler_gpus.split(",") if g.strip()]
    processes = ProcessBackend(dict(os.environ), gpus)
    return processes.pool, None, processes


def build(
    settings: Settings, args: argparse.Namespace
) -> tuple[ControlLoop, ProcessBackend | None]:
    """The control loop over every model's pool, connected to Redis, and the local processes."""
    redis = connections.sync_client(settings)
    storage = open_store(
        settings.storage,
        secret=b"",
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
    )
    recovery = Recovery(
        redis,
        JobStore(redis, Ledger.of(settings)),
        RecoveryConfig.of(settings),
        storage,
        getattr(storage, "prefix", ""),
    )
    catalog = Catalog.from_settings(settings)
    backend_for, pattern, processes = backends_of(args.backend or settings.scaler_backend, settings)
    models = pooled(catalog, settings.scaler_models, pattern)
    left = [m for m in catalog.models if m not in models]
    if left:
        log.info(
            "no pool for %s here: another scaler, KEDA or a person sizes them", ", ".join(left)
        )
    reading = Reading(
        catalog.default,
        settings.heartbeat_s * 3,
        settings.loop_stale_s,
        settings.scaler_low_priority_scales,
    )
    policy = policy_of(settings, args)
    flags = (args.min_workers, args.max_workers)
    pools = pools_of(catalog, models, policy, reading, backend_for, flags)
    for pool in pools:
        config = pool.config
        log.info("pool %s: %d to %d workers", pool.model, config.min_workers, config.max_workers)
    return ControlLoop(redis, pools, recovery, policy.interval_s), processes


def main(argv: list[str] | None = None) -> int:
    """Run the control loop until SIGTERM/SIGINT, then drain the workers it started."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["simulate"]:
        from scaler.simulate import main as simulate

        return simulate(argv[1:])
    args = parser().parse_args(argv)
    try:
        settings = load_settings()
        logging.basicConfig(
            level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s"
        )
        loop, processes = build(settings, args)
    except ConfigError as e:
        print(f"dq: {e.message}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, loop.stop)
    signal.signal(signal.SIGINT, loop.stop)
    log.info("scaler running with the %s backend", args.backend or settings.scaler_backend)
    loop.run()
    if processes is not None:
        processes.stop_all(settings.scaler_drain_timeout_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
