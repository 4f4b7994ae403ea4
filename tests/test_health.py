"""The worker liveness probe (`python -m worker.health`) against a real Redis and a real worker."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from core import heartbeats, keys
from core.embedded import free_port
from core.heartbeats import WorkerBeat, WorkerState
from tests.conftest import ROOT, WorkerProcess, wait_until
from worker.health import node_name, problem


def beat(name: str, loop_at: float | None, state: WorkerState = WorkerState.IDLE) -> WorkerBeat:
    now = time.time()
    return WorkerBeat(name=name, state=state, started_at=now - 60, at=now, loop_at=loop_at)


def probe(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run the probe as Kubernetes would: a fresh process, exit code and stderr."""
    return subprocess.run(
        [sys.executable, "-m", "worker.health", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("loop_age_s", "max_age_s", "expected"),
    [
        (1.0, 120.0, None),
        (119.0, 120.0, None),
        (121.0, 120.0, "its work loop last ran 121 s ago (limit 120 s)"),
        (None, 120.0, "its work loop has not run yet (state idle)"),
    ],
)
def test_a_loop_is_judged_by_the_age_of_its_last_round(
    loop_age_s: float | None, max_age_s: float, expected: str | None
) -> None:
    now = 1_000_000.0
    loop_at = None if loop_age_s is None else now - loop_age_s
    assert problem(beat("w", loop_at), max_age_s, now) == expected


def test_no_heartbeat_is_a_problem() -> None:
    assert problem(None, 120.0, time.time()) == "no heartbeat"


def test_a_plain_name_is_looked_up_the_way_celery_names_the_node() -> None:
    assert node_name("dq-worker-7d9c5b8f6-4kx2p") == "celery@dq-worker-7d9c5b8f6-4kx2p"
    assert node_name("w1@host") == "w1@host"


def test_a_worker_whose_loop_moved_passes(env: dict[str, str], rclient: redis.Redis) -> None:
    heartbeats.publish(rclient, beat("celery@pod-a", time.time() - 2), ttl_s=30)
    result = probe(env, "--name", "pod-a")
    assert (result.returncode, result.stderr) == (0, "")


def test_a_stale_loop_fails_though_the_heartbeat_is_fresh(
    env: dict[str, str], rclient: redis.Redis
) -> None:
    heartbeats.publish(rclient, beat("celery@pod-a", time.time() - 300), ttl_s=30)
    result = probe(env, "--name", "pod-a")
    assert result.returncode == 1
    # 300 s, and the moments the probe took to start.
    assert re.search(
        r"celery@pod-a: its work loop last ran 30\d s ago \(limit 120 s\)", result.stderr
    )


def test_the_limit_comes_from_the_flag_or_the_setting(
    env: dict[str, str], rclient: redis.Redis
) -> None:
    heartbeats.publish(rclient, beat("celery@pod-a", time.time() - 30), ttl_s=30)
    assert probe(env, "--name", "pod-a").returncode == 0
    assert probe(env, "--name", "pod-a", "--max-age", "10").returncode == 1
    assert probe({**env, "DQ_LOOP_STALE_S": "10"}, "--name", "pod-a").returncode == 1


def test_a_worker_still_loading_its_model_fails(env: dict[str, str], rclient: redis.Redis) -> None:
    heartbeats.publish(rclient, beat("celery@pod-a", None, WorkerState.STARTING), ttl_s=30)
    result = probe(env, "--name", "pod-a")
    assert result.returncode == 1
    assert "has not run yet (state starting)" in result.stderr


def test_a_missing_heartbeat_fails(env: dict[str, str], rclient: redis.Redis) -> None:
    heartbeats.publish(rclient, beat("celery@pod-b", time.time()), ttl_s=30)
    result = probe(env, "--name", "pod-a")
    assert result.returncode == 1
    assert "celery@pod-a: no heartbeat" in result.stderr


def test_a_stopped_heartbeat_fails(env: dict[str, str], rclient: redis.Redis) -> None:
    # A dead worker's last beat is kept (the recovery sweep reads what it held): it is old.
    stopped = beat("celery@pod-a", time.time()).model_copy(update={"at": time.time() - 60})
    heartbeats.publish(rclient, stopped)
    result = probe(env, "--name", "pod-a")
    assert result.returncode == 1
    assert "last heartbeat is" in result.stderr


def test_redis_down_is_its_own_answer(env: dict[str, str]) -> None:
    nowhere = {**env, "DQ_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    result = probe(nowhere, "--name", "pod-a")
    assert result.returncode == 3
    assert "Redis unreachable" in result.stderr
    assert probe(nowhere, "--name", "pod-a", "--redis-down-ok").returncode == 0


def test_bad_settings_are_reported(env: dict[str, str]) -> None:
    result = probe({**env, "DQ_LOOP_STALE_S": "-1"}, "--name", "pod-a")
    assert result.returncode == 2
    assert "DQ_LOOP_STALE_S" in result.stderr


def test_a_real_worker_named_like_a_pod_is_found_by_the_probe(
    env: dict[str, str], rclient: redis.Redis, tmp_path: Path
) -> None:
    """`python -m worker --name $(POD_NAME)` and the probe agree on the heartbeat's key."""
    pod = f"dq-worker-{os.getpid()}-h5w8r"
    worker = WorkerProcess(env, tmp_path / "worker.log", pod)
    try:
        found = wait_until(
            lambda: heartbeats.live(rclient, 30), timeout=90, what="the worker's heartbeat"
        )
        assert [b.name for b in found] == [node_name(pod)]
        ready = wait_until(
            lambda: (b := probe_beat(rclient, pod)) is not None and b.state != "starting" and b,
            timeout=90,
            what="the model to load",
        )
        assert ready.loop_at is not None
        result = probe(env, "--name", pod)
        assert (result.returncode, result.stderr) == (0, "")
    finally:
        worker.stop()


def probe_beat(rclient: redis.Redis, pod: str) -> WorkerBeat | None:
    raw = rclient.get(keys.worker(node_name(pod)))
    return WorkerBeat.model_validate_json(raw) if raw else None
