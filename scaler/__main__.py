"""`python -m scaler`: the autoscaler and reaper; `python -m scaler simulate …`: the simulator."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
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
from scaler.process import ProcessBackend
from scaler.signals import Reading

log = logging.getLogger("scaler")
T = TypeVar("T")


def parser() -> argparse.ArgumentParser:
    """Flags override the DQ_SCALER_* settings."""
    p = argparse.ArgumentParser(prog="dq scaler", description=__doc__)
    p.add_argument("--backend", choices=["process", "docker", "kubernetes"])
    p.add_argument("--min", type=int, dest="min_workers", help="fewest workers (0: scale to zero)")
    p.add_argument("--max", type=int, dest="max_workers", help="most workers")
    p.add_argument("--interval", type=float, dest="interval_s", help="seconds between ticks")
    return p


def policy_of(settings: Settings, args: argparse.Namespace) -> PolicyConfig:
    """The policy's knobs from settings, with command-line overrides."""
    return PolicyConfig(
        min_workers=_pick(args.min_workers, settings.scaler_min),
        max_workers=_pick(args.max_workers, settings.scaler_max),
        interval_s=_pick(args.interval_s, settings.scaler_interval_s),
        target_wait_s=settings.scaler_target_wait_s,
        down_window_s=settings.scaler_down_window_s,
        cooldown_s=settings.scaler_cooldown_s,
        max_step_up=settings.scaler_max_step_up,
    )


def _pick(flag: T | None, setting: T) -> T:
    return setting if flag is None else flag


def backend_of(name: str, settings: Settings) -> ScaleBackend:
    """The backend that starts and stops workers."""
    drain_s = settings.scaler_drain_timeout_s
    if name == "docker":
        return DockerBackend(settings.scaler_docker_project, stop_timeout_s=int(drain_s))
    if name == "kubernetes":
        return KubernetesBackend(settings.scaler_k8s_deployment, settings.scaler_k8s_namespace)
    gpus = [g for g in settings.scaler_gpus.split(",") if g.strip()]
    return ProcessBackend(dict(os.environ), gpus)


def build(settings: Settings, args: argparse.Namespace) -> tuple[ControlLoop, ScaleBackend]:
    """The control loop and the backend it drives, connected to Redis."""
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
    policy = policy_of(settings, args)
    backend = backend_of(args.backend or settings.scaler_backend, settings)
    reading = Reading(
        Catalog.from_settings(settings).default,
        settings.heartbeat_s * 3,
        settings.loop_stale_s,
        settings.scaler_low_priority_scales,
    )
    loop = ControlLoop(redis, backend, recovery, policy, reading)
    return loop, backend


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
        loop, backend = build(settings, args)
    except ConfigError as e:
        print(f"dq: {e.message}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, loop.stop)
    signal.signal(signal.SIGINT, loop.stop)
    log.info("scaler running with the %s backend", args.backend or settings.scaler_backend)
    loop.run()
    if isinstance(backend, ProcessBackend):
        backend.stop_all(settings.scaler_drain_timeout_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
