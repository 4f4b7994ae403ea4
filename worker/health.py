"""`python -m worker.health --name NAME`: a liveness probe that passes while the work loop moves.

A worker's heartbeat thread can outlive its work loop (a wedged CUDA call, a deadlock), so a
heartbeat alone proves the process, not the work. `loop_at` in the heartbeat is when the loop last
went round or took a denoising step. Exit codes:

- 0: the heartbeat exists and its loop ran within `--max-age` seconds (`DQ_LOOP_STALE_S`);
- 1: no heartbeat, a loop that has not run yet (the model is loading: cover that with a startup
  probe), or a stale one;
- 2: the settings or arguments are wrong;
- 3: Redis could not be read; 0 instead with `--redis-down-ok`, since restarting every worker
  during a Redis outage would only add model loads to it.
"""

from __future__ import annotations

import argparse
import sys
import time

from pydantic import ValidationError
from redis import Redis
from redis.exceptions import RedisError

from core import connections, keys
from core.errors import ConfigError
from core.heartbeats import WorkerBeat
from core.settings import load_settings

HEALTHY, UNHEALTHY, MISCONFIGURED, UNREACHABLE = 0, 1, 2, 3


def node_name(name: str) -> str:
    """The name a worker started with `--name NAME` beats under (Celery's rule for `--hostname`)."""
    return name if "@" in name else f"celery@{name}"


def read_beat(redis: Redis, name: str) -> WorkerBeat | None:
    """The worker's heartbeat; None when it has none (expired, never written, unreadable)."""
    raw = redis.get(keys.worker(name))
    if not raw:
        return None
    try:
        return WorkerBeat.model_validate_json(raw)
    except ValidationError:
        return None


def problem(
    beat: WorkerBeat | None, max_age_s: float, now: float, beat_ttl_s: float = float("inf")
) -> str | None:
    """What is wrong with the worker's work loop; None when it moved within `max_age_s`."""
    if beat is None:
        return "no heartbeat"
    if now - beat.at > beat_ttl_s:  # beats are kept after a worker dies: this one stopped
        return f"its last heartbeat is {now - beat.at:.0f} s old"
    if beat.loop_at is None:
        return f"its work loop has not run yet (state {beat.state})"
    age = now - beat.loop_at
    if age > max_age_s:
        return f"its work loop last ran {age:.0f} s ago (limit {max_age_s:.0f} s)"
    return None


def parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m worker.health", description=__doc__)
    p.add_argument("--name", required=True, help="the worker's --name (e.g. the pod's name)")
    p.add_argument("--max-age", type=float, help="seconds (default: DQ_LOOP_STALE_S)")
    p.add_argument("--redis-down-ok", action="store_true", help="pass when Redis is unreachable")
    return p


def main(argv: list[str] | None = None) -> int:
    """Check one worker; say what is wrong on stderr."""
    args = parser().parse_args(argv)
    try:
        settings = load_settings()
        redis = connections.sync_client(settings)
    except ConfigError as e:
        print(f"dq: {e.message}", file=sys.stderr)
        return MISCONFIGURED
    name = node_name(args.name)
    max_age_s = settings.loop_stale_s if args.max_age is None else args.max_age
    try:
        beat = read_beat(redis, name)
    except RedisError as e:
        print(f"worker {name}: Redis unreachable ({e})", file=sys.stderr)
        return HEALTHY if args.redis_down_ok else UNREACHABLE
    finally:
        redis.close()
    found = problem(beat, max_age_s, time.time(), settings.heartbeat_s * 3)
    if found is not None:
        print(f"worker {name}: {found}", file=sys.stderr)
        return UNHEALTHY
    return HEALTHY


if __name__ == "__main__":
    sys.exit(main())
