"""The scaler for real: `python -m scaler` with the process backend, the tiny model, real Redis.

The slow tests print the figures the issue asks for: time to the first extra worker, time back to
zero, jobs lost, and how long an up-down-up cycle takes.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from core import heartbeats, keys
from core.embedded import EmbeddedRedis
from core.heartbeats import ScalerStatus, WorkerBeat, WorkerState
from core.recovery import Recovery, RecoveryConfig
from core.store import Change, JobStore, Ledger
from scaler import signals
from scaler.backends import WorkerHandle
from scaler.loop import ControlLoop, Lock
from scaler.policy import PolicyConfig, Signals, WorkerInfo
from scaler.pools import Pool
from scaler.signals import Reading
from tests.conftest import (
    ROOT,
    Gateway,
    Scaler,
    client_for,
    live_workers,
    settings_from,
    wait_for,
    wait_until,
)

# 64x64 at 20 steps: a burst of 24 keeps one CPU worker busy for well over the target wait.
JOB = {"width": 64, "height": 64, "steps": 20}
HOLDING = "holding the fleet as it is"  # what the scaler logs for a tick without Redis
# Short knobs so that a whole up-down-up cycle fits in a test.
FAST_SCALER = {
    "DQ_SCALER_INTERVAL_S": "0.5",
    "DQ_SCALER_TARGET_WAIT_S": "2",
    "DQ_SCALER_DOWN_WINDOW_S": "3",
    "DQ_SCALER_COOLDOWN_S": "4",
    "DQ_HEARTBEAT_S": "0.5",
    "DQ_LEASE_S": "3",
    "DQ_CPU_THREADS": "1",
    "DQ_PROGRESS_INTERVAL_S": "0.2",
}


@pytest.fixture
def scale_env(env: dict[str, str]) -> dict[str, str]:
    """The test environment with the short scaler knobs."""
    return {**env, **FAST_SCALER}


def submit(client: httpx.Client, n: int, label: str) -> list[str]:
    """Submit `n` small jobs."""
    return [
        client.post("/v1/jobs", json={"prompt": f"{label} {i}", **JOB}).json()["id"]
        for i in range(n)
    ]


def started_workers(scaler: Scaler) -> list[str]:
    """The `started worker …` lines of a scaler's log."""
    return [line for line in read_log(scaler).splitlines() if "started worker" in line]


def read_log(scaler: Scaler) -> str:
    """What a scaler (and the workers it started) logged so far."""
    return scaler.log_path.read_text(errors="replace")


def alive(pid: int) -> bool:
    """Whether a process exists (and is not a zombie of ours)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    return True


@dataclass
class Fleet:
    """Samples the fleet a few times a second: workers serving, and the scaler's own count."""

    redis_url: str
    ttl_s: float
    samples: list[tuple[float, int, ScalerStatus | None]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        r = redis.Redis.from_url(self.redis_url, decode_responses=True)
        while not self.stop.wait(0.1):
            beats = heartbeats.live(r, self.ttl_s)
            serving = sum(1 for b in beats if b.state != WorkerState.STARTING)
            self.samples.append((time.monotonic(), serving, heartbeats.scaler_status(r)))
        r.close()

    def first(self, since: float, check: Callable[[int, ScalerStatus | None], bool]) -> float:
        """Seconds after `since` of the first sample that passes `check`."""
        return next(t for t, n, s in self.samples if t >= since and check(n, s)) - since

    def peak(self, since: float, until: float) -> int:
        """Most workers serving at once between two times."""
        return max((n for t, n, _ in self.samples if since <= t <= until), default=0)

    def close(self) -> None:
        """Stop sampling."""
        self.stop.set()
        self.thread.join(5)


@pytest.fixture
def fleet(scale_env: dict[str, str]) -> Iterator[Fleet]:
    """A fleet sampler on the test's Redis."""
    sampler = Fleet(scale_env["DQ_REDIS_URL"], float(scale_env["DQ_HEARTBEAT_S"]) * 3)
    yield sampler
    sampler.close()


def decided_since(r: redis.Redis, at: float) -> ScalerStatus | None:
    """The scaler's decision, once it is one made after `at`."""
    status = heartbeats.scaler_status(r)
    return status if status is not None and status.at > at else None


def scaled_to_zero(r: redis.Redis, env: dict[str, str]) -> bool:
    """No worker beats, and the scaler counts none running or starting."""
    status = heartbeats.scaler_status(r)
    beats = heartbeats.live(r, float(env["DQ_HEARTBEAT_S"]) * 3)
    return not beats and status is not None and status.current == status.desired == 0


@pytest.mark.slow
def test_a_burst_scales_up_from_zero_drains_back_and_scales_up_again(
    scale_env: dict[str, str],
    rclient: redis.Redis,
    gateway_factory: Callable[[dict[str, str]], Gateway],
    scaler_factory: Callable[..., Scaler],
    fleet: Fleet,
) -> None:
    scaler = scaler_factory(scale_env, "--min", "0", "--max", "3")
    wait_until(lambda: heartbeats.scaler_status(rclient), 30, "the scaler's first decision")
    assert not started_workers(scaler)  # min 0, nothing queued: nothing started
    with client_for(gateway_factory(scale_env)) as client:
        t0 = time.monotonic()
        first = submit(client, 24, "burst one")
        done1 = [wait_for(client, i, timeout=150) for i in first]
        t_done1 = time.monotonic()
        wait_until(lambda: scaled_to_zero(rclient, scale_env), 60, "the fleet back at zero")
        t_zero = time.monotonic()
        second = submit(client, 12, "burst two")
        done2 = [wait_for(client, i, timeout=150) for i in second]
        t_done2 = time.monotonic()
    jobs = done1 + done2
    assert [j["status"] for j in jobs] == ["succeeded"] * 36
    assert fleet.peak(t0, t_done1) > 1, f"one worker did the burst:\n{read_log(scaler)[-3000:]}"
    assert fleet.peak(t_zero, t_done2) >= 1
    assert len(started_workers(scaler)) <= 3 + 3  # at most max_workers per burst, none replaced
    print_timeline(fleet, (t0, t_done1, t_zero, t_done2), jobs, len(started_workers(scaler)))


def print_timeline(
    fleet: Fleet, marks: tuple[float, float, float, float], jobs: list[dict[str, Any]], started: int
) -> None:
    """The figures for the closing note, from the fleet's samples and the jobs' records."""
    t0, t_done1, t_zero, t_done2 = marks
    decided = fleet.first(t0, lambda _, s: s is not None and s.desired > 1)
    first_extra = fleet.first(t0, lambda n, _: n >= 2)
    first_back = fleet.first(t_zero, lambda n, _: n >= 1)
    lost = sum(1 for j in jobs if j["status"] != "succeeded")
    twice = sum(1 for j in jobs if j["metrics"]["attempts"] > 1)
    print(
        "\nSCALER timeline (process backend, tiny model, min 0, max 3):"
        f"\n  burst one, 24 jobs: more than one worker decided {decided:.1f} s,"
        f" first worker serving {fleet.first(t0, lambda n, _: n >= 1):.1f} s,"
        f" first extra worker serving {first_extra:.1f} s,"
        f" peak {fleet.peak(t0, t_done1)}, all done {t_done1 - t0:.1f} s"
        f"\n  back to zero {t_zero - t_done1:.1f} s after the last job ({t_zero - t0:.1f} s in all)"
        f"\n  burst two, 12 jobs: first worker serving again {first_back:.1f} s,"
        f" peak {fleet.peak(t_zero, t_done2)}, all done {t_done2 - t_zero:.1f} s"
        f"\n  up-down-up: {t_zero - t0 + first_back:.1f} s from the first burst to serving again"
        f"\n  jobs lost {lost} of {len(jobs)}, run twice {twice}; workers started {started}"
    )


@pytest.mark.slow
def test_a_second_scaler_waits_for_the_lock_and_takes_over_when_the_first_dies(
    scale_env: dict[str, str],
    rclient: redis.Redis,
    scaler_factory: Callable[..., Scaler],
) -> None:
    first = scaler_factory(scale_env, "--min", "1", "--max", "1")
    wait_until(lambda: live_workers(rclient, scale_env), 90, "the first scaler's worker")
    second = scaler_factory(scale_env, "--min", "1", "--max", "1")
    wait_until(lambda: "another scaler holds the lock" in read_log(second), 30, "second to wait")
    time.sleep(2)  # several ticks in which the second must start nothing
    assert not started_workers(second)
    orphan = live_workers(rclient, scale_env)[0]
    assert orphan.pid is not None
    first.process.kill()  # kill -9: no release, the lock has to expire
    killed = time.monotonic()
    wait_until(lambda: started_workers(second), 30, "the second scaler to take over")
    takeover = time.monotonic() - killed
    wait_until(lambda: not alive(orphan.pid or 0), 60, "the dead scaler's worker to drain")
    mine = wait_until(lambda: live_workers(rclient, scale_env), 90, "the second scaler's worker")
    assert [b.name.startswith(f"dq-worker-{second.process.pid}-") for b in mine] == [True]
    assert "took the scaler lock" in read_log(second)
    print(f"\nSCALER lock: second scaler took over {takeover:.1f} s after kill -9 (TTL 10 s)")


@pytest.mark.slow
def test_the_loop_holds_its_workers_while_redis_is_down(
    scale_env: dict[str, str], tmp_path: Path, scaler_factory: Callable[..., Scaler]
) -> None:
    server = EmbeddedRedis(tmp_path / "own-redis").start()
    env = {**scale_env, "DQ_REDIS_URL": server.url}
    r = redis.Redis.from_url(server.url, decode_responses=True)
    try:
        scaler = scaler_factory(env, "--min", "1", "--max", "2")
        (worker,) = wait_until(lambda: live_workers(r, env), 90, "a worker")
        server.stop()
        # Six failed ticks: three seconds, past the workers' heartbeat TTL.
        wait_until(lambda: read_log(scaler).count(HOLDING) >= 6, 30, "failed ticks")
        assert scaler.process.poll() is None
        assert worker.pid is not None
        assert alive(worker.pid)
        EmbeddedRedis(tmp_path / "own-redis", server.port).start()
        back = wait_until(lambda: live_workers(r, env), 60, "the worker beating again")
        restarted = time.time()
        decided = wait_until(lambda: decided_since(r, restarted + 1.0), 30, "the scaler again")
    finally:
        r.close()
        with contextlib.suppress(redis.RedisError):
            redis.Redis.from_url(server.url).shutdown(nosave=True)
    assert [(b.name, b.pid) for b in back] == [(worker.name, worker.pid)]
    assert (decided.current, decided.desired) == (1, 1)
    assert len(started_workers(scaler)) == 1


def test_the_lock_admits_one_holder_until_released_or_expired(rclient: redis.Redis) -> None:
    first, second = Lock(rclient, ttl_s=0.3), Lock(rclient, ttl_s=0.3)
    assert (first.hold(), second.hold(), first.hold()) == (True, False, True)
    first.release()
    assert (second.hold(), first.hold()) == (True, False)
    second.release()
    first.release()  # not its lock any more: a no-op
    assert first.hold()
    time.sleep(0.4)  # the holder died without releasing: its lock expires
    assert second.hold()
    first.release()
    assert rclient.get(keys.SCALER_LOCK) == second.token


def test_queue_and_metrics_show_the_scalers_decision(
    rclient: redis.Redis, client: httpx.Client
) -> None:
    before = client.get("/v1/queue").json()
    metrics_before = client.get("/metrics").text
    now = time.time()
    pools = {
        "tiny": ScalerStatus(current=1, desired=3, reason="backlog 24 jobs", at=now),
        "tiny-sd2": ScalerStatus(current=0, desired=0, reason="backlog 0 jobs", at=now),
    }
    heartbeats.publish_scaler(rclient, pools, ttl_s=30)
    after = client.get("/v1/queue").json()
    metrics = client.get("/metrics").text
    heartbeats.publish_scaler(rclient, {"tiny": pools["tiny"]}, ttl_s=30)  # the next tick
    one = client.get("/v1/queue").json()
    assert (before["scaler"], before["pools"]) == (None, {})
    assert not [s for s in metrics_before.splitlines() if s.startswith("dq_scaler_workers")]
    assert after == {
        **before,
        "scaler": {"current": 1, "desired": 3, "reason": "per model: tiny 1->3, tiny-sd2 0->0"},
        "pools": {
            "tiny": {"current": 1, "desired": 3, "reason": "backlog 24 jobs"},
            "tiny-sd2": {"current": 0, "desired": 0, "reason": "backlog 0 jobs"},
        },
    }
    assert {
        'dq_scaler_workers_current{model="tiny"} 1.0',
        'dq_scaler_workers_current{model="tiny-sd2"} 0.0',
        'dq_scaler_workers_desired{model="tiny"} 3.0',
        'dq_scaler_workers_desired{model="tiny-sd2"} 0.0',
    } <= set(metrics.splitlines())
    tiny = after["pools"]["tiny"]
    assert one == {**after, "scaler": tiny, "pools": {"tiny": tiny}}
    assert 0 < rclient.pttl(keys.SCALER_POOLS) <= 30_000


def test_dq_scaler_simulate_runs_through_the_cli(tmp_path: Path) -> None:
    argv = ["scaler", "simulate", "--trace", "all", "--out", str(tmp_path)]
    out = subprocess.run(
        [sys.executable, "-m", "core.cli", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    policies = [line.split()[:2] for line in out.stdout.splitlines() if line.split()[1:2]]
    for trace in ("steady", "burst", "diurnal"):
        rows = [p for t, p in policies if t == trace]
        assert rows == ["ours", "seed", "keda", "oracle"], out.stdout
        assert (tmp_path / f"{trace}.png").read_bytes()[:4] == b"\x89PNG"


def beat(name: str, state: WorkerState, **extra: Any) -> WorkerBeat:
    """A heartbeat sent just now."""
    now = time.time()
    return WorkerBeat(name=name, state=state, started_at=now - 60, at=now, **extra)


def test_heartbeats_join_the_workers_each_backend_names() -> None:
    handles = [
        WorkerHandle("dq-worker-41-1@vm", "dq-worker-41-1@vm"),  # process: the full node name
        WorkerHandle("dq-worker-41-2@vm", "dq-worker-41-2@vm", stopping=True),
        WorkerHandle("3f2a9c1b7e6d5a4f", "3f2a9c1b7e6d"),  # docker: the container's host name
        WorkerHandle("dq-worker-7d9c5b8f6-4kx2p", "dq-worker-7d9c5b8f6-4kx2p"),  # k8s: the pod
        WorkerHandle("dq-worker-41-3@vm", "dq-worker-41-3@vm"),  # no heartbeat yet
    ]
    beats = [
        beat("dq-worker-41-1@vm", WorkerState.IDLE, images_per_s=2.0, idle_since=5.0),
        beat("dq-worker-41-2@vm", WorkerState.BUSY),
        beat("dq-worker-1@3f2a9c1b7e6d", WorkerState.BUSY, images_per_s=3.0),
        beat("dq-worker-1@dq-worker-7d9c5b8f6-4kx2p", WorkerState.IDLE, idle_since=7.0),
    ]
    assert signals.worker_infos(handles, beats) == (
        WorkerInfo("dq-worker-41-1@vm", WorkerState.IDLE, 2.0, 5.0),
        WorkerInfo("dq-worker-41-2@vm", WorkerState.DRAINING),
        WorkerInfo("3f2a9c1b7e6d5a4f", WorkerState.BUSY, 3.0),
        WorkerInfo("dq-worker-7d9c5b8f6-4kx2p", WorkerState.IDLE, None, 7.0),
        WorkerInfo("dq-worker-41-3@vm", WorkerState.STARTING),
    )


def test_signals_read_the_ledgers_backlog_in_images_and_the_fleet(rclient: redis.Redis) -> None:
    from tests.test_store import record, store_with

    store = store_with(rclient, margin=2)
    now = time.time()
    jobs = [
        record("a", num_images=2),  # will run
        record("a", num_images=3),  # dispatched
        record("b", num_images=4),  # waiting
        record("c", "low", num_images=1),  # waiting, low
    ]
    for rec in jobs:
        rec = replace(rec, created_at=now - 12)
        assert store.submit(rec).outcome == "created"
    store.must(Change("claim", jobs[0].id, worker="w1@vm", lease=now + 30))
    busy = beat("w1@vm", WorkerState.BUSY, model="m", prefetch=0, images_per_s=1.5)
    idle = beat("w2@vm", WorkerState.IDLE, model="m", prefetch=8, idle_since=now - 2)
    stale = beat("w3@vm", WorkerState.BUSY, model="m", loop_at=now - 600)  # a hung pipeline
    for b in (busy, idle, stale):
        heartbeats.publish(rclient, b)
    handles = [WorkerHandle(n, n) for n in ("w1@vm", "w2@vm", "w3@vm")]
    reading = Reading("m", heartbeat_ttl_s=30, loop_stale_s=120)
    read = signals.read(rclient, reading, handles)
    assert read.oldest_wait_s == pytest.approx(12, abs=1)
    workers = (
        WorkerInfo("w1@vm", WorkerState.BUSY, 1.5),
        WorkerInfo("w2@vm", WorkerState.IDLE, None, idle.idle_since),
        WorkerInfo("w3@vm", WorkerState.DRAINING),  # its loop is stale: no capacity from it
    )
    assert replace(read, oldest_wait_s=12) == Signals(
        queued=3 + 4 + 1, in_flight=2, oldest_wait_s=12, workers=workers
    )
    # With `low` work kept from scaling, the low job's image is not backlog.
    no_low = signals.read(rclient, replace(reading, low_scales=False), handles)
    assert no_low.queued == 3 + 4


class FlakyBackend:
    """A backend whose first launch fails, as a Docker or Kubernetes API call can."""

    def __init__(self) -> None:
        self.workers: list[WorkerHandle] = []
        self.calls = 0

    def list_workers(self) -> list[WorkerHandle]:
        """The workers launched so far."""
        return list(self.workers)

    def add(self, n: int) -> None:
        """Fail the first time, then launch."""
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("the engine API timed out")
        self.workers += [WorkerHandle(f"w{i}@x", f"w{i}@x") for i in range(n)]

    def drain(self, worker_id: str) -> None:
        """Never asked to here."""


def test_a_failing_tick_does_not_stop_the_loop(rclient: redis.Redis, redis_url: str) -> None:
    backend = FlakyBackend()
    store = JobStore(rclient, Ledger.of(settings_from({"DQ_REDIS_URL": redis_url})))
    recovery = Recovery(rclient, store, RecoveryConfig(heartbeat_ttl_s=3))
    config = PolicyConfig(min_workers=2, max_workers=2, interval_s=0.05)
    pool = Pool("m", backend, config, Reading("m", heartbeat_ttl_s=3))
    loop = ControlLoop(rclient, [pool], recovery, config.interval_s)
    runner = threading.Thread(target=loop.run)
    runner.start()
    try:
        wait_until(lambda: len(backend.workers) == 2, 10, "the second launch")
    finally:
        loop.stop()
        runner.join(5)
    assert (backend.calls, rclient.get(keys.SCALER_LOCK)) == (2, None)  # lock released at stop
