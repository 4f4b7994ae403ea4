"""The README's fault table: real workers under a real scaler (which replaces dead workers and runs
the recovery sweep), real signals, a real Redis killed with SIGKILL.

Every figure is computed from the jobs and the workers' logs, never written down: jobs in flight
when the fault struck, jobs lost (not terminal, or gone from the ledger), jobs claimed a second
time (`metrics.attempts`), jobs whose pipeline call returned twice (the workers log `ran batch of
jobs <ids>` once per call), and when the last one ended. `pytest -m slow -s` prints the rows.
The tests share one stack and run in this order; the Redis restart is last.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from core import keys
from tests.conftest import wait_until
from tests.fault_parts import (
    TERMINAL,
    FaultRow,
    Stack,
    attempts,
    ended,
    pipeline_runs,
    stack_of,
    submit,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Stack]:
    """One worker under the scaler, a Redis with an append-only file (`appendfsync everysec`)."""
    knobs = {"DQ_MAX_ATTEMPTS": "2"}
    with stack_of(tmp_path_factory.mktemp("faults"), model_cache, knobs, 1, aof=True) as built:
        yield built


def stored_objects(stack: Stack, job_ids: list[str]) -> set[int]:
    """How many images each job has in storage (each of these jobs makes one)."""
    return {len(list((stack.tmp / "images" / j).glob("*.png"))) for j in job_ids}


def running_batch(stack: Stack, client: httpx.Client, n: int) -> tuple[list[str], int, str]:
    """Submit `n` jobs and wait for a batch of them to run; the ids, the worker's pid and name."""
    (beat,) = stack.serving(1)
    ids = submit(client, n, "in flight")
    wait_until(lambda: stack.redis.zcard(keys.RUNNING), 60, "a running batch")
    assert beat.pid is not None
    return ids, beat.pid, beat.name


def test_sigterm_mid_batch_drains_and_runs_nothing_twice(stack: Stack) -> None:
    with stack.client() as client:
        ids, pid, _ = running_batch(stack, client, 20)
        struck = time.time()
        os.kill(pid, signal.SIGTERM)
        jobs = ended(client, ids, 180)
    runs = pipeline_runs(*stack.logs())
    row = FaultRow.of("SIGTERM of the worker mid-batch (drain)", jobs, runs, struck)
    row.print()
    assert [j["status"] for j in jobs.values()] == ["succeeded"] * 20
    assert (row.lost, row.second_attempt, row.run_twice) == (0, 0, 0)  # a drain finishes its batch
    assert stored_objects(stack, ids) == {1}


def test_kill_9_mid_batch_loses_nothing_and_runs_again_only_the_killed_batch(stack: Stack) -> None:
    with stack.client() as client:
        ids, pid, victim = running_batch(stack, client, 24)
        struck = time.time()
        os.kill(pid, signal.SIGKILL)
        # What the dead worker had claimed, read from the ledger before its leases run out: the
        # batch in its pipeline and the one it was storing.
        records = {j: stack.record(j) for j in ids}
        claimed = {
            j
            for j, r in records.items()
            if (r.get("status"), r.get("worker")) == ("running", victim)
        }
        jobs = ended(client, ids, 180)
    runs = pipeline_runs(*stack.logs())
    row = FaultRow.of("`kill -9` of the worker mid-batch", jobs, runs, struck)
    row.print()
    print(f"  claimed by the killed worker: {len(claimed)}; claimed again: {row.second_attempt}")
    assert [j["status"] for j in jobs.values()] == ["succeeded"] * 24
    assert row.lost == 0
    assert claimed
    assert {j for j, job in jobs.items() if attempts(job) > 1} == claimed
    assert {j for j in ids if runs[j] > 1} <= claimed  # only a batch stored when it died
    assert stored_objects(stack, ids) == {1}  # deterministic keys: a re-run overwrites


def test_a_poison_job_fails_after_max_attempts_and_others_succeed(stack: Stack) -> None:
    """The poison: whenever this job runs, its worker dies (the test kills it, kill -9)."""
    with stack.client() as client:
        stack.serving(1)
        (poison,) = submit(client, 1, "poison", steps=150)
        struck = time.time()
        kills = 0
        deadline = time.monotonic() + 180
        job = client.get(f"/v1/jobs/{poison}").json()
        while job["status"] not in TERMINAL and time.monotonic() < deadline:
            if job["status"] == "running" and job["metrics"]["attempts"] > kills:
                (beat,) = stack.serving(1)
                assert beat.pid is not None
                os.kill(beat.pid, signal.SIGKILL)
                kills += 1
            time.sleep(0.05)
            job = client.get(f"/v1/jobs/{poison}").json()
        others = submit(client, 3, "after the poison")
        done = ended(client, others, 120)
    row = FaultRow.of(
        "poison job (its worker killed on each attempt), `DQ_MAX_ATTEMPTS=2`",
        {poison: job},
        pipeline_runs(*stack.logs()),
        struck,
    )
    row = replace(row, outcome=f"{job['status']} `{job['error']['code']}`")
    row.print()
    assert (job["status"], job["error"]["code"], kills) == ("failed", "max_attempts", 2)
    assert [d["status"] for d in done.values()] == ["succeeded"] * 3


class Submitter:
    """Submits jobs one after another in a thread, noting when each 202 came."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client
        self.acked: list[tuple[str, float]] = []
        self.refused = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        body = {"prompt": "during the crash", "width": 64, "height": 64, "steps": 20}
        while not self.stopped.is_set():
            try:
                resp = self.client.post("/v1/jobs", json=body)
            except httpx.TransportError:
                resp = None
            if resp is not None and resp.status_code == 202:
                self.acked.append((resp.json()["id"], time.time()))
            else:
                assert resp is None or (resp.status_code == 503 and "retry-after" in resp.headers)
                self.refused += 1
            self.stopped.wait(0.25)

    def stop(self) -> None:
        """Stop submitting."""
        self.stopped.set()
        self.thread.join(30)


def test_redis_killed_9_and_restarted_from_its_aof(stack: Stack) -> None:
    """SIGKILL gives Redis no chance to flush: what `appendfsync everysec` keeps is what survives.

    A host that dies may lose the last second of acknowledged writes; a process killed keeps what
    it wrote to the kernel. The test counts both: the jobs gone from the ledger, and those of them
    acknowledged more than a second before the kill (which must be none).
    """
    server = stack.server
    assert server.process is not None
    with stack.client() as client, stack.client() as feed:
        stack.serving(1)
        submitter = Submitter(feed)
        # Jobs pour in while a batch runs, up to the very moment of the kill.
        wait_until(
            lambda: (
                stack.redis.zcard(keys.RUNNING)
                and submitter.acked
                and time.time() - submitter.acked[0][1] > 3
            ),
            60,
            "a running batch and three seconds of submits",
        )
        os.kill(server.process.pid, signal.SIGKILL)
        killed = time.time()
        server.process.wait()
        down = client.post("/v1/jobs", json={"prompt": "while down", "width": 64, "height": 64})
        time.sleep(2)  # Redis stays down for two seconds
        server.start()  # the same port, directory and append-only file
        back = time.time()
        submitter.stop()
        acked = [(j, t) for j, t in submitter.acked if t <= killed]
        in_flight = [j for j, _ in acked]
        jobs = ended(client, in_flight, 240)
    gone = {j for j, job in jobs.items() if job["status"] == "gone"}
    late = {j for j, t in acked if t > killed - 1.0}  # what everysec may lose to a host crash
    runs = pipeline_runs(*stack.logs())
    row = FaultRow.of("Redis `kill -9`ed, down 2 s, restarted from its AOF", jobs, runs, back)
    row.print()
    print(
        f"  acknowledged before the kill: {len(acked)} ({len(late)} in its last second); "
        f"gone from the ledger: {len(gone)} (of those, in the last second: {len(gone & late)}); "
        f"submits refused while down: {submitter.refused}"
    )
    assert down.status_code == 503
    assert "retry-after" in down.headers
    assert not gone - late, "acknowledged more than a second before the kill, and lost"
    assert row.lost == len(gone)
    assert all(jobs[j]["status"] == "succeeded" for j in in_flight if j not in gone)
